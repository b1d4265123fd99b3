"""Third-party model patching (``vitkern.integrations.timm``): planned, not part of this release."""

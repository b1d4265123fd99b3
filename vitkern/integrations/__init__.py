"""Third-party model patching: ``vitkern.integrations.timm.patch_model(model)``."""

"""Third-party model patching: ``vitkern.integrations.timm.patch_model(model, token_drop=...,
token_merge=...)``."""

"""Third-party model patching: ``vitkern.integrations.timm.patch_model(model, token_drop=...,
token_merge=...)`` for timm models, and (through the same call) models built from the papers'
own repositories, LITv2, PPMA and EViT, recognised by class name and layout
(:mod:`vitkern.integrations.papers`)."""

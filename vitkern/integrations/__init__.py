"""Third-party model patching, the top layer (it imports ``vitkern.nn`` and ``vitkern.ops``; they
never import it at module level):

* :mod:`vitkern.integrations.timm` — ``patch_model(model, token_drop=..., token_merge=...)`` for
  timm models, one adapter module per family (``swin``, ``xcit``, ``vit``), and (through the same
  call) models built from the papers' own repositories, LITv2, PPMA and EViT, recognised by class
  name and layout (:mod:`vitkern.integrations.papers`);
* :mod:`vitkern.integrations.transformers` — ``patch_model`` for Hugging Face Swin / Swin V2 /
  ViT / DINOv2;
* ``vitkern.integrations._common`` — what they share (``PatchReport``, option checks).
"""

"""Public ops ``vitkern.ops.<op>(...)``, each with ``backend="auto"|"cuda"|"triton"|"eager"|"reference"``.

One module per op family (``hilo``, ``linear``, ``ppma``, ``token``, ``window``); each one's
``__all__`` is exported here.
"""
from vitkern._families import export_families

__all__ = export_families(__name__, __path__, globals())

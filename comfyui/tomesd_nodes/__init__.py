"""tomesd's ComfyUI nodes: copy or link this folder into ComfyUI's custom_nodes/ (README "ComfyUI").

It needs this repository's tomesd in ComfyUI's Python (pip install -e <this repository>); a link to the
folder inside a checkout also finds the checkout's tomesd. PyPI's tomesd (0.1.3) has no ComfyUI support.
"""
import os
import sys

try:
    import tomesd
except ImportError:
    tomesd = None
if tomesd is None or not hasattr(tomesd, "is_patched"):
    _checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if not os.path.isfile(os.path.join(_checkout, "tomesd", "__init__.py")):
        raise ImportError("tomesd_nodes needs tomesd 0.2 or later in ComfyUI's Python: pip install -e <the tomesd "
                          "repository> (PyPI's tomesd 0.1.3 has no ComfyUI support)")
    sys.path.insert(0, _checkout)
    for _name in [name for name in sys.modules if name == "tomesd" or name.startswith("tomesd.")]:
        del sys.modules[_name]

from .nodes import TokenMerging  # noqa: E402

NODE_CLASS_MAPPINGS = {"TomesdTokenMerging": TokenMerging}
NODE_DISPLAY_NAME_MAPPINGS = {"TomesdTokenMerging": "Token Merging (tomesd)"}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

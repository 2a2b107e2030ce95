"""deftlab: reproducible DeFT, WeLore and OSD experiments."""

__version__ = "0.1.0"

from deftlab.errors import DeftlabError  # noqa: E402

__all__ = ["DeftlabError", "__version__"]

"""datasets' WebDataset builder, but a text member that is not UTF-8 loads as None instead of failing the split.

datasets decodes ``.txt`` / ``.text`` / ``.transcript`` members with a strict ``bytes.decode("utf-8")`` inside its
own reader: one caption written in Latin-1 makes a map-style load refuse the whole split, and kills a streaming run
partway through with a ``UnicodeDecodeError`` naming no file. Here such a caption is None, which the collator skips
and counts as ``missing_caption``, as it does a sample without a caption. Everything else is datasets' builder.
Imported only where a webdataset is loaded (it imports ``datasets``); a module of its own so that workers started by
``spawn`` can unpickle a streaming dataset built from it.
"""

from __future__ import annotations

from datasets.packaged_modules.webdataset.webdataset import WebDataset

TEXT_EXTENSIONS = ("txt", "text", "transcript")  # the members datasets decodes as UTF-8 text


def utf8_or_none(data: bytes) -> str | None:
    """``data`` decoded as UTF-8, or None where it is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class LenientWebDataset(WebDataset):
    """`WebDataset` whose text members decode with [`utf8_or_none`]; set as a builder instance's class."""

    DECODERS = {**WebDataset.DECODERS, **dict.fromkeys(TEXT_EXTENSIONS, utf8_or_none)}

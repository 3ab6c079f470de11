"""datasets' WebDataset builder, but a text member that is not UTF-8 loads as None instead of failing the split.

datasets decodes ``.txt`` / ``.text`` / ``.transcript`` members with a strict ``bytes.decode("utf-8")`` inside its
own reader: one caption written in Latin-1 makes a map-style load refuse the whole split, and kills a streaming run
partway through with a ``UnicodeDecodeError`` naming no file. Here such a caption is None, which the collator skips
and counts as ``missing_caption``, as it does a sample without a caption; a member repeated within a sample keeps
its first copy instead of failing the split. Everything else is datasets' builder.
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


def first_of_each_field(tar_iterator):
    """A shard's ``(name, file)`` members with a sample's repeated field left out, its first copy kept: datasets
    raises on a repeated field (a sample written twice in a row), which failed the split, or a streaming run partway
    through, for one sample."""
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    key, seen = None, set()
    for name, member in tar_iterator:
        sample, field = base_plus_ext(name)
        if sample is not None:
            if sample != key:
                key, seen = sample, set()
            if field in seen:
                continue
            seen.add(field)
        yield name, member


class LenientWebDataset(WebDataset):
    """`WebDataset` whose text members decode with [`utf8_or_none`] and whose samples keep the first copy of a
    repeated member ([`first_of_each_field`]); set as a builder instance's class."""

    DECODERS = {**WebDataset.DECODERS, **dict.fromkeys(TEXT_EXTENSIONS, utf8_or_none)}

    @classmethod
    def _get_pipeline_from_tar(cls, tar_path, tar_iterator):
        yield from super()._get_pipeline_from_tar(tar_path, first_of_each_field(tar_iterator))

"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from tests.data.folders import write_uf_folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """`datasets.load_dataset` (and `load_dataset_builder`) on a Hub id answered from a local Hub-shaped
    folder (the machine has no network): records each load's arguments; the real library reads the folder."""
    import datasets

    import alignlab.data.files

    folder = write_uf_folder(tmp_path / "hub_copy")
    real, calls = datasets.load_dataset, []
    builder = datasets.load_dataset_builder

    def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "streaming": streaming})
        assert path == "someone/ultrafeedback"
        return real(str(folder), name=name, split=split, streaming=streaming, **kwargs)

    monkeypatch.setattr(alignlab.data.files, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    # what alignlab asks first (which files the split has, alignlab.data.files.hub_data_files)
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, *a, **k: builder(str(folder), *a, **k))
    return calls

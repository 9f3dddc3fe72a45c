"""GlobalSums: named fields through one reduction, read back by name and shape."""

from __future__ import annotations

import pytest
import torch

from qmoe_lightning.global_sums import GlobalSums


def test_fields_keep_names_and_shapes_through_one_reduction():
    calls = []

    def reduce(flat):  # a 2-rank sum seen from one rank: the other rank's values are this rank's + 1
        calls.append(flat.clone())
        return flat + (flat + 1)

    sums = GlobalSums("cpu", n=3, ce=torch.tensor(1.5))
    sums.add("mtp_ce", 0.0, (2,))  # a window without micro-batches broadcasts to the field's shape
    sums.add("counts", torch.arange(6).reshape(2, 3))
    out = sums.reduced(reduce)
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].numel() == 1 + 1 + 2 + 6
    assert out.value("n") == 7 and out.value("ce") == 4.0
    assert out["mtp_ce"].tolist() == [1.0, 1.0]
    assert out["counts"].shape == (2, 3) and out["counts"].tolist() == [[1, 3, 5], [7, 9, 11]]
    assert "counts" in out and "other" not in out


def test_sums_add_field_by_field_and_refuse_other_layouts():
    a = GlobalSums("cpu", x=1, y=torch.ones(2))
    b = GlobalSums("cpu", x=2, y=torch.full((2,), 3.0))
    assert (a + b).value("x") == 3 and (a + b)["y"].tolist() == [4.0, 4.0]
    with pytest.raises(ValueError, match="different fields"):
        a + GlobalSums("cpu", y=torch.ones(2), x=1)
    with pytest.raises(KeyError, match="already"):
        a.add("x", 5)

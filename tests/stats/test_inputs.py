"""Collecting, checking and flattening what grad_stats is given."""

import pytest
import torch

from gradscope.stats.inputs import check_tensor, collect_tensors, flat_elements, is_dense


def test_module_gives_gradients_by_name_skipping_none_and_counting_shared_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    frozen = torch.nn.Linear(4, 1)
    frozen.requires_grad_(False)
    model.append(frozen)
    model(torch.randn(2, 4)).sum().backward()
    tensors, names = collect_tensors(model)
    assert names == ("0.weight", "0.bias", "2.bias")
    assert tensors[0] is model[0].weight.grad


def test_single_tensor_and_iterables():
    x = torch.ones(3)
    assert collect_tensors(x) == ([x], None)
    assert collect_tensors(t for t in [x, x]) == ([x, x], None)
    with pytest.raises(TypeError, match=r"nn\.Module, a tensor or a list"):
        collect_tensors(3.0)
    with pytest.raises(TypeError, match=r"nn\.Module, a tensor or a list"):
        collect_tensors("weights")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtypes_are_rejected_with_index_and_dtype(dtype):
    with pytest.raises(TypeError, match=rf"tensor 3 .*has dtype {dtype}"):
        check_tensor(torch.zeros(2, dtype=dtype), 3)


def test_errors_name_the_parameter():
    with pytest.raises(TypeError, match=r"tensor 1 \('layer.bias'\) has dtype torch.int64"):
        check_tensor(torch.zeros(2, dtype=torch.int64), 1, ("layer.weight", "layer.bias"))


def test_meta_tensors_and_non_tensors_are_rejected():
    with pytest.raises(ValueError, match="tensor 0 is on the 'meta' device"):
        check_tensor(torch.zeros(2, device="meta"), 0)
    with pytest.raises(TypeError, match=r"tensor 2 is NoneType, not a torch\.Tensor"):
        check_tensor(None, 2)


@pytest.mark.parametrize(
    ("make", "dense"),
    [
        (lambda: torch.zeros(3, 4), True),
        (lambda: torch.zeros(3, 4).t(), True),
        (lambda: torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), True),
        (lambda: torch.zeros(3, 1, 4).transpose(0, 2), True),
        (lambda: torch.zeros(3, 4)[:, ::2], False),
        (lambda: torch.zeros(3, 4)[:, 1:], False),
        (lambda: torch.zeros(1, 4).expand(3, 4), False),
    ],
)
def test_is_dense(make, dense):
    assert is_dense(make()) is dense


def test_dense_views_are_read_in_place_and_gapped_views_copied():
    base = torch.arange(12.0).reshape(3, 4)
    view = flat_elements(base.t()).values
    assert view.data_ptr() == base.data_ptr()
    assert sorted(view.tolist()) == sorted(base.reshape(-1).tolist())
    stepped = base[:, ::2]
    flat = flat_elements(stepped).values
    assert sorted(flat.tolist()) == sorted(stepped.reshape(-1).tolist())
    offset = base.reshape(-1)[5:]
    assert flat_elements(offset).values.data_ptr() == offset.data_ptr()


@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")
def test_sparse_tensors_give_values_and_implicit_zeros():
    coo = torch.sparse_coo_tensor(
        [[0, 0, 2]], [1.0, 2.0, 0.0], (5,), check_invariants=True
    )  # uncoalesced: index 0 twice
    flat = flat_elements(coo)
    assert sorted(flat.values.tolist()) == [0.0, 3.0]
    assert flat.implicit_zeros == 3
    csr = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse_csr()
    flat = flat_elements(csr)
    assert sorted(flat.values.tolist()) == [2.0, 3.0]
    assert flat.implicit_zeros == 2

"""AlphaEdit: the null-space projection, the closed form against the paper's, and the property that
matters: the update leaves the preserved keys' outputs unchanged (ΔW K0 ≈ 0), unlike MEMIT's."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, SAMPLE, gpt2, llama, read_at_subject

from flearning.editing.alphaedit import alphaedit_edit, alphaedit_update, null_space_projection
from flearning.editing.architectures import architecture_of
from flearning.editing.covariance import CovarianceSettings, second_moment
from flearning.editing.deltas import apply_deltas
from flearning.editing.requests import as_requests
from flearning.errors import FlearnError
from flearning.models import model_fingerprint

# 40 tokens of keys 64 wide: C has rank 40 at most, so the preserved keys leave a null space to write in
FEW = CovarianceSettings(corpus=SAMPLE, max_tokens=40, max_length=128, dtype="float64")


def _preserved_keys(model, tok, module: str) -> torch.Tensor:
    """The 40 corpus keys C was computed from, ``[40, in]``."""
    rows = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, args, out: rows.append(args[0][0]))
    from flearning.editing.covariance import load_corpus

    with torch.no_grad():
        model(**tok(load_corpus(SAMPLE).texts[0], truncation=True, max_length=128, return_tensors="pt"))
    handle.remove()
    return torch.cat(rows)[:40].double()


def test_the_projection_spans_the_small_eigenvalues():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    c = q @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1e-2, 1e-3, 0.0], dtype=torch.float64)) @ q.T
    p = null_space_projection(c, threshold=2e-2)
    assert torch.allclose(p, q[:, 3:] @ q[:, 3:].T, atol=1e-12)
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T)
    assert torch.linalg.norm(p @ q[:, :3]) < 1e-12
    with pytest.raises(FlearnError, match="null space is empty.*raise the threshold"):
        null_space_projection(c + torch.eye(6, dtype=torch.float64), threshold=2e-2)


def test_the_solve_is_the_papers_closed_form():
    """Xᵀ from (P(KKᵀ + K_pK_pᵀ) + αI) X = P K Rᵀ equals R Kᵀ P (K_pK_pᵀP + KKᵀP + αI)⁻¹."""
    torch.manual_seed(1)
    d, n = 10, 3
    keys, residuals = torch.randn(n, d, dtype=torch.float64), torch.randn(n, 4, dtype=torch.float64)
    a = torch.randn(d, 6, dtype=torch.float64)
    p = null_space_projection(a @ a.T, threshold=1e-6)  # rank 6: a 4-dimensional null space
    previous = torch.randn(d, 2, dtype=torch.float64)
    previous = previous @ previous.T
    k, r = keys.T, residuals.T
    paper = (
        r @ k.T @ p @ torch.linalg.inv(previous @ p + k @ k.T @ p + 10.0 * torch.eye(d, dtype=torch.float64))
    )
    assert torch.allclose(alphaedit_update(residuals, keys, p, previous, l2=10.0), paper, atol=1e-10)
    assert torch.linalg.norm(alphaedit_update(residuals, keys, p, None, l2=1.0) @ a) < 1e-10


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_the_update_leaves_the_preserved_keys_outputs_unchanged(build, tok):
    model = build()
    arch = architecture_of(model)
    before = model_fingerprint(model)
    module = arch.rewrite_name(1)
    c = second_moment(model, tok, module, FEW)
    k0 = _preserved_keys(model, tok, module)
    assert torch.allclose(c, k0.T @ k0 / 40, rtol=1e-5, atol=1e-5)
    eigenvalues = torch.linalg.eigvalsh(c)
    threshold = float(eigenvalues[-1]) * 1e-9
    assert int((eigenvalues < threshold).sum()) == 64 - 40

    result = alphaedit_edit(
        model, tok, REQUESTS, [1, 2], nullspace_threshold=threshold, l2=1.0, covariance=FEW
    )
    assert model_fingerprint(model) == before
    delta = result.deltas[arch.weight_name(1)].double()
    delta = delta.T if arch.conv1d else delta  # [out, in]
    assert torch.linalg.norm(delta) > 1e-3
    preserved = torch.linalg.norm(delta @ k0.T) / (torch.linalg.norm(delta) * torch.linalg.norm(k0))
    assert preserved < 1e-6
    # without the projection (P = I) the same solve does change them
    identity = torch.eye(64, dtype=torch.float64)
    plain = alphaedit_update(result.residuals[1] / 2, result.keys[1], identity, None, l2=1.0)
    assert torch.linalg.norm(plain @ k0.T) / (torch.linalg.norm(plain) * torch.linalg.norm(k0)) > 1e-2
    # and the edit still moves the residual stream towards z
    requests = as_requests(REQUESTS)
    z_module = arch.block_name(2)
    outputs = torch.stack([read_at_subject(model, tok, r, z_module, "out") for r in requests])
    apply_deltas(model, result.deltas)
    after = torch.stack([read_at_subject(model, tok, r, z_module, "out") for r in requests])
    assert torch.linalg.norm(result.targets - after) < torch.linalg.norm(result.targets - outputs)


def test_sequential_batches_carry_the_earlier_keys(tok):
    model = llama()
    arch = architecture_of(model)
    c = second_moment(model, tok, arch.rewrite_name(1), FEW)
    threshold = float(torch.linalg.eigvalsh(c)[-1]) * 1e-9
    first = alphaedit_edit(
        model, tok, REQUESTS[:2], [1], nullspace_threshold=threshold, l2=1.0, covariance=FEW
    )
    # keys_moment: K Kᵀ of this batch's keys, read on the edited model
    apply_deltas(model, first.deltas)
    k = first.keys[1].double()  # read before the update; layer 1's own update does not change its keys
    assert torch.allclose(first.keys_moment[1], k.T @ k, rtol=1e-4, atol=1e-6)
    second = alphaedit_edit(
        model,
        tok,
        REQUESTS[2:],
        [1],
        l2=1.0,
        projections=first.projections,
        previous_keys=first.keys_moment,
    )
    k2 = second.keys[1].double()
    assert torch.allclose(second.keys_moment[1], first.keys_moment[1] + k2.T @ k2, rtol=1e-4, atol=1e-6)
    expected = alphaedit_update(
        second.residuals[1], second.keys[1], first.projections[1], first.keys_moment[1], 1.0
    )
    assert torch.allclose(second.deltas[arch.weight_name(1)].double(), expected, rtol=1e-4, atol=1e-6)

import pytest
import torch

from deftlab.checksums import digest
from deftlab.linalg import thin_svd


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (11, 11)])
def test_thin_svd_is_the_thin_svd_in_either_orientation(shape):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, s, Vh = thin_svd(M)
    k = min(shape)
    assert U.shape == (shape[0], k) and s.shape == (k,) and Vh.shape == (k, shape[1])
    torch.testing.assert_close(s, torch.linalg.svdvals(M), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag(s) @ Vh, M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=M.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=M.dtype), rtol=0, atol=1e-12)
    assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("algorithm", ["sha256", "crc32"])
def test_digest_sees_every_byte_name_dtype_and_shape(algorithm):
    t = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float64)}
    ref = digest(t, algorithm)
    assert digest(dict(reversed(list(t.items()))), algorithm) == ref  # order-independent
    flipped = {**t, "a": t["a"].clone()}
    flipped["a"].view(torch.uint8).reshape(-1)[17] ^= 1  # one bit
    assert digest(flipped, algorithm) != ref
    assert digest({**t, "a": t["a"].reshape(4, 3)}, algorithm) != ref
    assert digest({**t, "a": t["a"].view(torch.int32)}, algorithm) != ref
    assert digest({"c": t["a"], "b": t["b"]}, algorithm) != ref
    assert digest({**t, "a": t["a"].T}, algorithm) != ref  # non-contiguous input: hashed as its values
    with pytest.raises(ValueError, match="unknown digest"):
        digest(t, "md5")

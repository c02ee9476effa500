"""A static, preallocated KV cache (as in gpt-fast): one buffer per layer sized for the whole
generation, written in place, so decoding allocates nothing and its memory is known up front."""
import torch


class KVCache:
    """Keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim) each, plus the
    document id and position of every cached token (so packed or padded prompts keep their masks).

    Bytes per cached token = 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes per element.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.length = max_len, 0

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers actually allocated (document/position ids excluded)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self):
        self.length = 0

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def write(self, index: int, k, v):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this call needs {end}")
        self.k[index, :, :, start:end] = k
        self.v[index, :, :, start:end] = v
        return self.k[index, :, :, :end], self.v[index, :, :, :end]

    def advance(self, document_ids, position_ids):
        """Record the ids of the tokens just written by every layer and move the write position on."""
        T = document_ids.shape[1]
        self.document_ids[:, self.length:self.length + T] = document_ids
        self.position_ids[:, self.length:self.length + T] = position_ids
        self.length += T


class LayerCache:
    """One layer's view of a KVCache, handed to its attention module."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k, v):
        return self.cache.write(self.index, k, v)

"""Transformer blocks: where the norm sits is the whole difference.

Post-norm (Vaswani et al. 2017): x = norm(x + sublayer(x)); the residual stream is normalised after every
sublayer. Pre-norm (GPT-2 onward, Xiong et al. 2020): x = x + sublayer(norm(x)); the stream is left
untouched and the model needs a final norm before the head. OLMo 2 (OLMo et al. 2024, "2 OLMo 2 Furious"):
x = x + norm(sublayer(x)); the norm sits on each sublayer's output inside the residual branch, and a final
norm still precedes the head.
"""
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """The parts every placement shares: attention and feed-forward, each with its norm. A subclass says where
    the norms sit (forward) and whether the model needs a final norm before the head.

    dropout: residual dropout (GPT-2, nanoGPT's resid_dropout) on each sublayer's output before it joins the
    residual stream, in training only; 0 leaves the forward untouched."""
    needs_final_norm = True

    def __init__(self, attention: nn.Module, ffn: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = norm1, attention, norm2, ffn
        self.dropout = dropout

    def drop(self, x):
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x


class PreNormBlock(Block):
    needs_final_norm = True

    def forward(self, x, rotary=None, ctx=None, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), rotary, ctx, cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class PostNormBlock(Block):
    needs_final_norm = False

    def forward(self, x, rotary=None, ctx=None, cache=None):
        x = self.attn_norm(x + self.drop(self.attn(x, rotary, ctx, cache)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class OLMo2Block(Block):
    needs_final_norm = True

    def forward(self, x, rotary=None, ctx=None, cache=None):
        x = x + self.drop(self.attn_norm(self.attn(x, rotary, ctx, cache)))
        return x + self.drop(self.ffn_norm(self.ffn(x)))


BLOCKS = {"pre": PreNormBlock, "post": PostNormBlock, "olmo2": OLMo2Block}

"""The cost model: seconds per token from per-phase costs and acceptance, and projections for RTX 4090s.

The formulas live in offload_runtime/cost.py (shared with the engine's adaptive controller).

A TriForce round costs one L3 pass plus the L2 and L1 steps that drafted it, and yields
`accepted_per_pass` tokens:

    s/token = (t_L3(context) + n_L2 * t_L2 + n_L1 * t_L1) / accepted_per_pass

Autoregressive decoding with an offloaded cache is one L3 pass per token. Projections
replace measured phase costs by a bandwidth roofline of the target card: an L3 pass
streams the offloaded K/V over PCIe and reads the weights from GPU memory; an L2 step
reads the weights and the retrieval cache; an L1 step reads the draft's weights plus a
fixed launch overhead. They are projections, labelled as such, not measurements.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# the formulas are the engine's (its adaptive controller chooses gamma with them): one implementation
from offload_runtime.cost import PhaseCosts, expected_tokens_per_pass, seconds_per_token  # noqa: F401

GiB = 1024 ** 3


@dataclass(frozen=True)
class Card:
    name: str
    memory_bytes_per_s: float  # achievable GPU memory bandwidth
    link_bytes_per_s: float  # achievable pinned host-to-device bandwidth per card
    memory_gib: float


RTX_4090 = Card("RTX 4090 (PCIe 4.0 x16)", memory_bytes_per_s=0.8 * 1008e9, link_bytes_per_s=25e9, memory_gib=24)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_value


LLAMA2_7B_128K = ModelShape("Llama-2-7B-128K", 6.74e9, 32, 32, 128)
LLAMA31_8B = ModelShape("Llama-3.1-8B", 8.03e9, 32, 8, 128)
DRAFT_68M = ModelShape("Llama-68M draft", 68e6, 2, 12, 64)

# Published TriForce figures (Sun et al., 2024), Llama2-7B-128K at 128K context, offloading
PUBLISHED = [
    {"setup": "2x RTX 4090, TriForce", "s_per_token": 0.108},
    {"setup": "2x RTX 4090, autoregressive (offloaded)", "s_per_token": 0.84},
    {"setup": "1x RTX 4090, TriForce", "s_per_token": 0.312},
]


def roofline_costs(model: ModelShape, context: int, budget: int, card: Card = RTX_4090, n_cards: int = 1,
                   draft: ModelShape = DRAFT_68M, l1_launch_s: float = 1e-3) -> PhaseCosts:
    """Phase costs on `n_cards` cards: K/V and weights split by heads across cards (tensor parallel)."""
    l3 = context * model.kv_bytes_per_token / (card.link_bytes_per_s * n_cards) \
        + model.weight_bytes / (card.memory_bytes_per_s * n_cards)
    l2 = (model.weight_bytes + budget * model.kv_bytes_per_token) / (card.memory_bytes_per_s * n_cards)
    l1 = draft.weight_bytes / card.memory_bytes_per_s + l1_launch_s
    return PhaseCosts(l1, l2, l3)


def project(accepted_per_pass: float, l2_steps_per_pass: float, l1_steps_per_pass: float,
            contexts: tuple[int, ...] = (32768, 65536, 131072), budget: int = 4096) -> list[dict]:
    """Projected s/token for 1x and 2x RTX 4090 (autoregressive and TriForce) for the two model shapes."""
    rows = []
    for model in (LLAMA2_7B_128K, LLAMA31_8B):
        for n_cards in (1, 2):
            for context in contexts:
                costs = roofline_costs(model, context, budget, n_cards=n_cards)
                rows.append({
                    "model": model.name, "cards": n_cards, "context": context,
                    "kv_cache_gib": context * model.kv_bytes_per_token / GiB,
                    "autoregressive_s_per_token": costs.l3_pass_s,
                    "triforce_s_per_token": seconds_per_token(costs, accepted_per_pass, l2_steps_per_pass,
                                                              l1_steps_per_pass),
                    "phase_costs": asdict(costs),
                })
    return rows

"""Shape registry shared by the tests and the benchmarks.

Every case is a real layer of a released model (spec ``hilo-ppma.md`` section 1.6, 1.7), so a
benchmark number always answers "how fast is this layer of that model". Tests import the same
cases (``HILO_CASES``) plus the small odd ones in ``HILO_TEST_CASES`` (non-divisible maps, H != W,
s = 1, alpha edge cases) so tests and benchmarks never drift apart.

Batch sizes: ``batch`` is the GPU batch (64, as LITv2's throughput numbers), ``cpu_batch`` keeps a
CPU run to a few minutes. ``HiLoCase.batch_for(device)`` picks one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["HiLoCase", "HILO_CASES", "HILO_TEST_CASES", "HILO_QUICK_CASES", "get_case", "hilo_cases"]


@dataclass(frozen=True)
class HiLoCase:
    """One HiLo layer: an H x W token map, ``dim`` channels, ``heads`` heads, LITv2's alpha and s.

    Derived quantities follow LITv2 exactly: ``num_lo_heads = int(heads * alpha)`` (float product,
    truncated), the rest Hi-Fi, and ``window_size == 1`` makes every head Lo-Fi.
    """

    name: str
    H: int
    W: int
    dim: int
    heads: int
    alpha: float
    window_size: int
    batch: int = 64          # GPU batch
    cpu_batch: int = 8       # CPU batch (keeps `python -m vitkern.bench` on a CPU to minutes)
    qkv_bias: bool = True    # every released LITv2 config uses qkv_bias=True
    note: str = ""
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"{self.name}: dim {self.dim} not divisible by heads {self.heads}")
        if self.window_size < 1 or self.H < 1 or self.W < 1:
            raise ValueError(f"{self.name}: bad sizes")

    # -- derived --------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_lo_heads(self) -> int:
        if self.window_size == 1:
            return self.heads
        return int(self.heads * self.alpha)

    @property
    def num_hi_heads(self) -> int:
        return self.heads - self.num_lo_heads

    @property
    def N(self) -> int:
        """Tokens of the (unpadded) map."""
        return self.H * self.W

    @property
    def hw(self) -> tuple[int, int]:
        return (self.H, self.W)

    @property
    def divisible(self) -> bool:
        return self.H % self.window_size == 0 and self.W % self.window_size == 0

    @property
    def needs_pad(self) -> bool:
        """True when the map must be zero-padded (LITv2 detection semantics) to run Hi-Fi/Lo-Fi."""
        return not self.divisible

    @property
    def Hp(self) -> int:
        return self.window_size * math.ceil(self.H / self.window_size)

    @property
    def Wp(self) -> int:
        return self.window_size * math.ceil(self.W / self.window_size)

    @property
    def M(self) -> int:
        """Lo-Fi keys: tokens of the s x s average-pooled (padded) map."""
        return (self.Hp // self.window_size) * (self.Wp // self.window_size)

    @property
    def num_windows(self) -> int:
        return self.M

    def batch_for(self, device) -> int:
        kind = getattr(device, "type", str(device)).split(":")[0]
        return self.batch if kind == "cuda" else self.cpu_batch

    def describe(self) -> str:
        return (f"{self.H}x{self.W} dim{self.dim} h{self.heads} d{self.head_dim} "
                f"s{self.window_size} hi{self.num_hi_heads}/lo{self.num_lo_heads} M{self.M}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tags"] = list(self.tags)
        d.update(head_dim=self.head_dim, num_lo_heads=self.num_lo_heads,
                 num_hi_heads=self.num_hi_heads, N=self.N, M=self.M, Hp=self.Hp, Wp=self.Wp)
        return d


# Benchmark cases: real LITv2 layers (all alpha 0.9, qkv_bias=True, see spec section 1.6).
HILO_CASES: tuple[HiLoCase, ...] = (
    HiLoCase("litv2s_s3_224", 14, 14, 384, 12, 0.9, 2,
             note="LITv2-S/M stage 3 at 224^2 (10 Lo-Fi + 2 Hi-Fi heads, d 32, 49 pooled keys)",
             tags=("litv2-s", "224")),
    HiLoCase("litv2s_s3_448_ws2", 28, 28, 384, 12, 0.9, 2,
             note="LITv2-S stage 3 at 448^2 (28x28 map), s = 2", tags=("litv2-s", "448")),
    HiLoCase("litv2s_s3_448_ws4", 28, 28, 384, 12, 0.9, 4,
             note="LITv2-S stage 3 at 448^2 with the detection 'ws_4' window (s = 4)",
             tags=("litv2-s", "448", "det")),
    HiLoCase("litv2b_s3_224", 14, 14, 512, 16, 0.9, 2,
             note="LITv2-B stage 3 at 224^2 (14 Lo-Fi + 2 Hi-Fi heads, d 32)", tags=("litv2-b", "224")),
    HiLoCase("litv2b_s3_384", 24, 24, 512, 16, 0.9, 2,
             note="LITv2-B-384 stage 3 (24x24 map, 144 pooled keys)", tags=("litv2-b", "384")),
    HiLoCase("hilo_layer_bench", 14, 14, 768, 12, 0.9, 2,
             note="single-layer benchmark setting of LITv2's README (HubHop/vit-attention-benchmark): "
                  "298.3 MFLOPs (MACs), batch 64", tags=("layer-bench", "224")),
    HiLoCase("litv2s_s4_224", 7, 7, 768, 24, 0.9, 1,
             note="LITv2-S stage 4 at 224^2: s = 1 makes HiLo plain MHSA (all heads Lo-Fi, no pooling)",
             tags=("litv2-s", "224", "ws1")),
    HiLoCase("litv2s_s3_det_ws4", 50, 84, 384, 12, 0.9, 4, batch=2, cpu_batch=1,
             note="RetinaNet LITv2-S 'ws_4' at 800x1333 (stride 16: 50x84); 50 % 4 != 0, so the map is "
                  "zero-padded to 52x84 (detection semantics)", tags=("litv2-s", "det", "pad")),
)

# The short CPU run of `python -m vitkern.bench --quick` (and the end-to-end test).
HILO_QUICK_CASES: tuple[str, ...] = ("litv2s_s3_224", "litv2s_s3_448_ws4")

# Small, odd shapes for correctness tests (fast under the Triton interpreter).
HILO_TEST_CASES: tuple[HiLoCase, ...] = (
    HiLoCase("t_readme_demo", 14, 14, 384, 12, 0.5, 2, batch=2, cpu_batch=2,
             note="README demo HiLo(384, 12, ws=2, alpha=0.5): 6 + 6 heads"),
    HiLoCase("t_small_even", 4, 6, 64, 4, 0.5, 2, batch=2, cpu_batch=2, note="H != W, divisible"),
    HiLoCase("t_odd_pad", 5, 7, 64, 4, 0.5, 2, batch=2, cpu_batch=2, note="non-divisible: needs padding"),
    HiLoCase("t_odd_ws3", 7, 5, 48, 3, 0.7, 3, batch=2, cpu_batch=2, note="s = 3, 3*0.7 = 2.1 -> 2 Lo-Fi"),
    HiLoCase("t_one_token", 1, 1, 32, 2, 0.5, 2, batch=2, cpu_batch=2, note="N = 1, padded to one 2x2 window"),
    HiLoCase("t_ws1", 3, 5, 64, 4, 0.9, 1, batch=2, cpu_batch=2, note="s = 1: plain MHSA"),
    HiLoCase("t_all_lofi", 6, 6, 64, 4, 1.0, 2, batch=2, cpu_batch=2, note="alpha 1: no Hi-Fi heads"),
    HiLoCase("t_all_hifi", 6, 4, 64, 4, 0.2, 2, batch=2, cpu_batch=2, note="4*0.2 = 0.8 -> 0 Lo-Fi heads"),
    HiLoCase("t_d80", 4, 4, 160, 2, 0.5, 2, batch=1, cpu_batch=1, note="head_dim 80"),
    HiLoCase("t_d16_ws4", 9, 8, 64, 4, 0.9, 4, batch=2, cpu_batch=2, note="d 16, s 4, padded H"),
)

_ALL = {c.name: c for c in HILO_CASES + HILO_TEST_CASES}


def get_case(name: str) -> HiLoCase:
    try:
        return _ALL[name]
    except KeyError:
        raise KeyError(f"unknown HiLo case {name!r}; known: {sorted(_ALL)}") from None


def select_cases(family: str, cases: tuple, quick_names: tuple[str, ...], select: str | None,
                 quick: bool, pool: tuple = ()) -> list:
    """``cases`` (those named ``quick_names`` with ``quick``), or with ``select`` those of
    ``pool`` (default ``cases``) matching a comma-separated list of names / substrings / tags."""
    pool = pool or cases
    by_name = {c.name: c for c in pool}
    if not select:
        return [by_name[n] for n in quick_names] if quick else list(cases)
    keys = [k.strip() for k in select.split(",") if k.strip()]
    out = [c for c in pool if any(k == c.name or k in c.name or k in c.tags for k in keys)]
    if not out:
        raise KeyError(f"no {family} case matches {select!r}; known: {sorted(by_name)}")
    return out


def hilo_cases(select: str | None = None, *, quick: bool = False) -> list[HiLoCase]:
    """Benchmark cases, optionally filtered by a comma-separated list of names / substrings / tags."""
    return select_cases("HiLo", HILO_CASES, HILO_QUICK_CASES, select, quick, HILO_CASES + HILO_TEST_CASES)


# ---------------------------------------------------------------------------------------------
# Window attention (Swin): the attention layer of every Swin-T / S / B stage at 224 (ws 7) and
# 384 (ws 12), head dim 32 everywhere (specs/window-tokendrop.md A1, "Typical sizes"). Swin-S has
# Swin-T's stage shapes (only the depth differs): the T cases carry the "swin_s" tag too.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowCase:
    """One Swin attention layer: an H x W map, ``heads`` heads of ``head_dim``, window ``ws``,
    shift ``shift`` (SW-MSA, every second block; 0 where Swin clamps the window to the map)."""

    name: str
    H: int
    W: int
    heads: int
    head_dim: int
    window_size: int
    shift: int
    batch: int = 64          # GPU batch (Swin's throughput batch)
    cpu_batch: int = 1
    note: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def n_windows(self) -> int:
        ws = min(self.window_size, self.H, self.W)
        return math.ceil(self.H / ws) * math.ceil(self.W / ws)

    def describe(self) -> str:
        return (f"{self.H}x{self.W} h{self.heads} d{self.head_dim} ws{self.window_size} "
                f"s{self.shift}")


def _swin_stages(model: str, heads: tuple[int, ...], res: int, ws: int, batch: int,
                 tags: tuple[str, ...]) -> tuple[WindowCase, ...]:
    out = []
    for i, h in enumerate(heads):
        m = res // 4 // 2 ** i
        shift = ws // 2 if m > ws else 0  # the last stage at 224 / 384: one global window
        out.append(WindowCase(f"{model}_{res}_s{i + 1}", m, m, h, 32, ws, shift,
                              batch=batch, tags=tags + (f"{res}", f"stage{i + 1}")))
    return tuple(out)


WINDOW_CASES = (
    _swin_stages("swin_t", (3, 6, 12, 24), 224, 7, 64, ("swin_t", "swin_s"))
    + _swin_stages("swin_b", (4, 8, 16, 32), 224, 7, 64, ("swin_b",))
    + _swin_stages("swin_t", (3, 6, 12, 24), 384, 12, 16, ("swin_t", "swin_s"))
    + _swin_stages("swin_b", (4, 8, 16, 32), 384, 12, 16, ("swin_b",))
)
WINDOW_TEST_CASES = (
    WindowCase("t_win_pad", 9, 13, 2, 16, 4, 2, batch=2, cpu_batch=2, note="padded, H != W"),
    WindowCase("t_win_small", 14, 14, 2, 32, 7, 3, batch=2, cpu_batch=1),
)
WINDOW_QUICK_CASES = ("t_win_small",)


def window_cases(select: str | None = None, *, quick: bool = False) -> list[WindowCase]:
    """Window benchmark cases, optionally filtered by names / substrings / tags (comma list)."""
    return select_cases("window", WINDOW_CASES, WINDOW_QUICK_CASES, select, quick,
                        WINDOW_CASES + WINDOW_TEST_CASES)

__all__ += ["WindowCase", "WINDOW_CASES", "WINDOW_TEST_CASES", "WINDOW_QUICK_CASES", "window_cases"]


# ================================================================================================
# Linear / softmax-free attention (vitkern.bench.bench_linear): XCiT XCA and L2ViT / generic
# kernelized linear attention, at the models' stage shapes and at high resolution.
# ================================================================================================


@dataclass(frozen=True)
class LinearCase:
    """One attention call: ``op`` "xca" (XCiT), "linear" (with ``preset`` of
    ``vitkern.ops.linear.PRESETS``) on (B, heads, N, head_dim) q, k, v, or "soft" (SOFT's
    Gaussian Nyström attention with ``landmarks`` landmarks per head)."""

    name: str
    op: str
    N: int
    heads: int
    head_dim: int
    preset: str = ""
    batch: int = 64          # GPU batch
    cpu_batch: int = 2
    note: str = ""
    tags: tuple[str, ...] = field(default=())
    landmarks: int = 0       # SOFT only: m

    def describe(self) -> str:
        extra = f" {self.preset}" if self.preset else ""
        extra += f" m={self.landmarks}" if self.op == "soft" else ""
        return f"{self.op}{extra} N={self.N} h={self.heads} d={self.head_dim}"


LINEAR_CASES: tuple[LinearCase, ...] = (
    # XCiT (timm xcit_*): XCA blocks see the patch tokens; dim 384 / 8 heads = 48 (S), 512 / 8 = 64 (M)
    LinearCase("xcit_s_p16_224", "xca", 196, 8, 48, note="XCiT-S12/16 @224", tags=("xcit",)),
    LinearCase("xcit_s_p8_224", "xca", 784, 8, 48, note="XCiT-S12/8 @224", tags=("xcit",)),
    LinearCase("xcit_m_p16_224", "xca", 196, 8, 64, note="XCiT-M24/16 @224", tags=("xcit",)),
    LinearCase("xcit_m_p8_224", "xca", 784, 8, 64, note="XCiT-M24/8 @224", tags=("xcit",)),
    LinearCase("xcit_s_p16_1024", "xca", 4096, 8, 48, batch=16, cpu_batch=1,
               note="XCiT-S12/16 @1024 (high resolution)", tags=("xcit", "highres")),
    LinearCase("xcit_s_p8_1024", "xca", 16384, 8, 48, batch=4, cpu_batch=1,
               note="XCiT-S12/8 @1024 (high resolution)", tags=("xcit", "highres")),
    # L2ViT-T LGA blocks (head_dim 32; heads 3/6/12/24 per stage; ReLU, clamp 100, temperature)
    LinearCase("l2vit_t_s1", "linear", 3136, 3, 32, "l2vit", note="L2ViT-T stage 1 @224", tags=("l2vit",)),
    LinearCase("l2vit_t_s2", "linear", 784, 6, 32, "l2vit", note="L2ViT-T stage 2 @224", tags=("l2vit",)),
    LinearCase("l2vit_t_s3", "linear", 196, 12, 32, "l2vit", note="L2ViT-T stage 3 @224", tags=("l2vit",)),
    LinearCase("l2vit_t_s4", "linear", 49, 24, 32, "l2vit", note="L2ViT-T stage 4 @224", tags=("l2vit",)),
    LinearCase("l2vit_t_s1_512", "linear", 16384, 3, 32, "l2vit", batch=8, cpu_batch=1,
               note="L2ViT-T stage 1 @512 (high resolution)", tags=("l2vit", "highres")),
    LinearCase("elu1_n4096_d64", "linear", 4096, 8, 64, "katharopoulos", batch=16, cpu_batch=1,
               note="Transformers-are-RNNs elu+1 at N = 4096", tags=("highres",)),
    # SOFT-Tiny/Small/Large stages 1-3 @224 (56², 28², 14² tokens; ratios 8/4/2 -> 49 landmarks;
    # head_dim 32, heads 2/4/10)
    LinearCase("soft_t_s1", "soft", 3136, 2, 32, landmarks=49, note="SOFT stage 1 @224",
               tags=("soft",)),
    LinearCase("soft_t_s2", "soft", 784, 4, 32, landmarks=49, note="SOFT stage 2 @224",
               tags=("soft",)),
    LinearCase("soft_t_s3", "soft", 196, 10, 32, landmarks=49, note="SOFT stage 3 @224",
               tags=("soft",)),
)

LINEAR_QUICK_CASES: tuple[str, ...] = ("xcit_s_p16_224", "l2vit_t_s3", "soft_t_s3")


def linear_cases(select: str | None = None, *, quick: bool = False) -> list[LinearCase]:
    """Benchmark cases, optionally filtered by a comma-separated list of names / substrings / tags."""
    return select_cases("linear", LINEAR_CASES, LINEAR_QUICK_CASES, select, quick)


__all__ += ["LinearCase", "LINEAR_CASES", "LINEAR_QUICK_CASES", "linear_cases"]


# ---------------------------------------------------------------------------------------------
# PPMA (polyline path masked attention): the stage maps of PPMA-T / S / B at 224 (spec
# hilo-ppma.md section 2.8), heads and head dims per stage. The released models run full (N×N)
# attention at 7² (and 14² in PPMA-T) and criss-cross attention on the larger maps; every stage
# is listed for the full op so the cost of the mask can be compared at each size.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PPMACase:
    """One PPMA attention layer: an H x W map, ``heads`` heads of ``head_dim``."""

    name: str
    H: int
    W: int
    heads: int
    head_dim: int
    batch: int = 64          # GPU batch (PPMA's throughput batch)
    cpu_batch: int = 1
    note: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        return f"{self.H}x{self.W} h{self.heads} d{self.head_dim}"


PPMA_CASES = (
    PPMACase("ppma_ts_s1", 56, 56, 4, 16, tags=("ppma_t", "ppma_s"), note="criss-cross in PPMA"),
    PPMACase("ppma_ts_s2", 28, 28, 4, 32, tags=("ppma_t", "ppma_s"), note="criss-cross in PPMA"),
    PPMACase("ppma_ts_s3", 14, 14, 8, 32, tags=("ppma_t", "ppma_s"), note="full in PPMA-T"),
    PPMACase("ppma_tsb_s4", 7, 7, 16, 32, tags=("ppma_t", "ppma_s", "ppma_b"), note="full"),
    PPMACase("ppma_b_s1", 56, 56, 5, 16, tags=("ppma_b",), note="criss-cross in PPMA"),
    PPMACase("ppma_b_s2", 28, 28, 5, 32, tags=("ppma_b",), note="criss-cross in PPMA"),
    PPMACase("ppma_b_s3", 14, 14, 10, 32, tags=("ppma_b",), note="criss-cross in PPMA"),
)
PPMA_QUICK_CASES = ("ppma_tsb_s4", "ppma_ts_s3")


def ppma_cases(select: str | None = None, *, quick: bool = False) -> list[PPMACase]:
    """PPMA benchmark cases, optionally filtered by names / substrings / tags (comma list)."""
    return select_cases("PPMA", PPMA_CASES, PPMA_QUICK_CASES, select, quick)


# ---------------------------------------------------------------------------------------------
# Token dropping (EViT / ToMe / TinyDrop): token_attention at ViT-S/B/L token counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCase:
    """One token-attention layer: N tokens (CLS included), ``heads`` × ``head_dim``, and the
    fraction of image tokens kept (EViT: K = 1 + ceil(keep · (N - 1)))."""

    name: str
    N: int
    heads: int
    head_dim: int
    keep: float
    batch: int = 64          # GPU batch
    cpu_batch: int = 1
    note: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def K(self) -> int:
        return 1 + math.ceil(self.keep * (self.N - 1))

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        return f"N{self.N} K{self.K} h{self.heads} d{self.head_dim}"


def _token_family(model: str, N: int, heads: int, note: str) -> tuple[TokenCase, ...]:
    return tuple(TokenCase(f"{model}_n{N}_k{int(keep * 100)}", N, heads, 64, keep, tags=(model,),
                           note=note) for keep in (0.9, 0.7, 0.5))


TOKEN_CASES = (
    _token_family("vits", 197, 6, "ViT-S/16 @224 (DeiT-S, EViT's model)")
    + _token_family("vitb", 577, 12, "ViT-B/16 @384")
    + _token_family("vitl", 1025, 16, "ViT-L/16 @512 (ViT-L/14 @448: 1025 tokens)")
)
TOKEN_QUICK_CASES = ("vits_n197_k70", "vitb_n577_k50")


@dataclass(frozen=True)
class TokenModelCase:
    """A whole timm ViT (random weights: timing only) with EViT dropping at ``keep``."""

    name: str
    model: str
    keep: float
    batch: int = 64
    cpu_batch: int = 2
    img_size: int = 224


TOKEN_MODEL_CASES = (TokenModelCase("vitb16_224_evit70", "vit_base_patch16_224", 0.7),)
# CPU smoke runs: ViT-Ti at 64x64 (17 tokens)
TOKEN_MODEL_QUICK_CPU = TokenModelCase("vitti16_64_evit70", "vit_tiny_patch16_224", 0.7,
                                       cpu_batch=1, img_size=64)


def token_cases(select: str | None = None, *, quick: bool = False) -> list[TokenCase]:
    """Token-attention benchmark cases, optionally filtered by names / substrings / tags."""
    return select_cases("token", TOKEN_CASES, TOKEN_QUICK_CASES, select, quick)


__all__ += ["TokenCase", "TOKEN_CASES", "TOKEN_QUICK_CASES", "TokenModelCase", "TOKEN_MODEL_CASES",
            "token_cases"]

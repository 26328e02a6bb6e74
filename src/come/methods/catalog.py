"""Every built-in method's spec: what it is, where its code is, its defaults and its own options.

Kept apart from the methods' code (which imports torch) so that the CLI builds its flags and help from
these definitions without loading any model code. The options shared by every method are in core/option_defs.py.
"""

from __future__ import annotations

from typing import Literal

from ..core.option_defs import Option
from .spec import MethodSpec

BUILTIN: tuple[MethodSpec, ...] = (
    MethodSpec(
        "come-search",
        "CoMe-search: each step applies the merge or deletion with the lowest calibration loss, each candidate refitted",
        entry="search:run",
        layerwise=True,
        # Calibration 128 x 128 tokens, 16 of them scored: the same token counts as 32 x 512 and 4, from more
        # documents. How this shape compares with 32 x 512 (it is not better on every model), and what the
        # method costs: bench/results/README.md.
        # Calibration activations in bfloat16: half the memory of the boundary cache, and the same picks as
        # float32 where compared (bench/results/README.md). Its layer passes under bfloat16 autocast where the
        # device computes it natively: the same picks as float32 where compared, at a fraction of the time.
        defaults={"refit": True, "allow_remerge": True, "search_samples": 16, "protect_first": 1,
                  "nsamples": 128, "seqlen": 128, "activation_dtype": "bfloat16", "autocast": "auto"},
        options=(
            Option("search_windows", int, 3, "merge candidates (most redundant windows) per step.", min=0),
            Option("search_deletions", int, 4, "deletion candidates per step (see --search-deletion-rank).", min=0),
            Option("search_deletion_rank", Literal["error", "bi", "loss", "error+loss"], "error",
                   "rank deletion candidates by skip error (distance to the original model at the end of the layer's "
                   "span if it is skipped), by block influence (bi), by the loss without refit on "
                   "--search-screen-samples sequences (loss: SLEB's score, every layer), or half by each of error "
                   "and loss (error+loss: more layer passes; results in bench/results/README.md)."),
            Option("search_screen_samples", int, 2, "calibration sequences of the loss screen of "
                                                     "--search-deletion-rank loss / error+loss.", min=1),
            Option("search_finalists", int, 3, "candidates scored on all --search-samples sequences: the N of "
                                               "lowest loss on the first --search-finalist-samples go on, the "
                                               "others are dropped (a screen: cheaper, and the same pick whenever "
                                               "the winner is among the N; 0: no screen).", min=0),
            Option("search_finalist_samples", int, 4, "calibration sequences of the --search-finalists screen "
                                                       "(a multiple of --batch-size keeps the finalists' losses "
                                                       "bit-identical to an unscreened run's).", min=1),
            Option("search_autocast", Literal["auto", "on", "off"], "auto",
                   "candidate losses under bfloat16 autocast: auto (where the device computes bfloat16 natively: "
                   "a CPU with AMX or AVX512-BF16, a GPU) | on | off. Only the ranking uses it: the candidates "
                   "themselves are built as --autocast says (the plan's execution record says which ran)."),
            Option("search_ratios", tuple[float, ...], (), "first-layer channel shares tried besides the BI ratio "
                                                           "(none by default: slower, and no better in "
                                                           "bench/results/README.md).", min=0, max=1),
        ),
    ),
    MethodSpec(
        "come",
        "CoMe: merge the most similar adjacent layers by concatenating their most sensitive channels",
        entry="come:run",
        layerwise=True,
        # Re-merging: without it, disjoint windows run out once a third of the layers go and the last merges
        # are forced wherever a pair is left (taking a 24-layer Qwen2 model to 13 layers fused its layers 0 and 1).
        # The paper's rule is --no-allow-remerge; the two compared: bench/results/README.md.
        defaults={"allow_remerge": True},
    ),
    MethodSpec(
        "come-p",
        "CoMe-p: CoMe with each merge's channel ratio grid-searched on the calibration loss",
        entry="come_p:run",
        needs="every later layer at once for each candidate's loss (a layer-by-layer what-if pass is not implemented)",
        options=(Option("granularity", int, 20, "channel-ratio grid steps (G+1 candidates per merge).", min=1),),
    ),
    MethodSpec(
        "laco",
        "LaCo: collapse layer windows by RDSC merging while the output stays similar to the original",
        entry="laco:run",
        needs="every layer at once (each tentative merge is run through the whole stack)",
        options=(
            Option("laco_thresholds", tuple[float, ...], (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
                   "similarity thresholds tried from high to low."),
            Option("laco_interval", int, 2, "step down after an accepted merge.", min=1),
            Option("laco_min_layer", int, 1, "lowest layer a merge may start at.", min=0),
        ),
    ),
    MethodSpec("shortgpt", "ShortGPT: delete the n layers with the lowest block influence (one shot)",
               entry="shortgpt:run", layerwise=True),
    MethodSpec(
        "sleb",
        "SLEB: iteratively delete the layer whose removal gives the lowest calibration loss",
        entry="sleb:run",
        needs="every later layer at once for each what-if loss (a layer-by-layer what-if pass is not implemented)",
    ),
    MethodSpec(
        "replaceme",
        "ReplaceMe: delete the most redundant block of layers and fold a fitted linear map into the layer before it",
        entry="replaceme:run",
        layerwise=True,
        options=(
            Option("replaceme_objective", Literal["lstsq", "cosine"], "lstsq",
                   "lstsq (closed form) | cosine (Adam, the authors' solver)."),
            Option("replaceme_blocks", int, 1, "remove the layers as this many blocks.", min=1),
            Option("replaceme_epochs", int, 10, "Adam epochs over the calibration tokens (--replaceme-objective cosine).", min=1),
        ),
    ),
    MethodSpec(
        "magnitude+",
        "Shortened LLaMA Magnitude+: delete the blocks with the smallest weight L1 norm (first 4 / last 2 kept)",
        entry="blockimportance:run_magnitude",
        layerwise=True,
    ),
    MethodSpec(
        "taylor+",
        "Shortened LLaMA Taylor+: delete the blocks with the smallest sum |W * dL/dW| (first 4 / last 2 kept)",
        entry="blockimportance:run_taylor",
        needs="a backward pass through the whole model",
    ),
    MethodSpec("reverse", "Reverse order: delete the n layers just before the final one (one shot)",
               entry="reverse:run", layerwise=True),
    MethodSpec(
        "drop",
        "Delete exactly the original layers given by --drop-layers (replay a layer choice)",
        entry="drop:run",
        layerwise=True,
        options=(Option("drop_layers", tuple[int, ...], (), "the original layers to delete (as many as the target "
                                                            "removes)."),),
    ),
    MethodSpec(
        "replay",
        "Apply the steps of a recorded come-search or CoMe plan without its search (--replay-plan)",
        entry="replay:run",
        layerwise=True,
        defaults_from="replay:plan_defaults",
        options=(Option("replay_plan", str | None, None, "the come_plan.json (or the model folder holding it) whose "
                                                         "steps --method replay applies; the calibration and "
                                                         "refit options default to the plan's (others are refused)."),),
    ),
)

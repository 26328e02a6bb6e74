"""An lm-eval HF model that computes LM-head logits only where a continuation is scored.

Multiple-choice tasks ask for log p(continuation | context). lm-eval's HFLM computes the head and a
log-softmax over the whole vocabulary at every position of every (right-padded) row, and then keeps
the few positions of the continuation. With a large vocabulary that is most of the work: Gemma 3's
head (262,144 x 640) costs 1.6x its 18 decoder layers per position, and the log-softmax streams
1 MB of logits per position.

HFLM already accepts a model call that returns fewer positions than it was given (it slices the
continuation relative to the end, as it does for prompt-tuning's virtual tokens), so returning the
last K positions of the padded batch is exact as long as every row's continuation lies within them.
K is found from the requests: each row is matched to the (context + continuation) it was built from.
When a row cannot be matched, the full logits are returned, as HFLM would.
"""

from __future__ import annotations

import inspect


def continuation_lm_class():
    """The HFLM subclass (built on first use: importing lm-eval is slow)."""
    from lm_eval.models.huggingface import HFLM

    class ContinuationLM(HFLM):
        _continuations: dict[tuple[int, ...], int] | None = None

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            # Each request is ((context, continuation), context_enc, continuation_enc). HFLM feeds
            # (context_enc + continuation_enc)[-(max_length + 1):][:-1] and scores its last len(cont) positions.
            self._continuations = {}
            for _, context_enc, continuation_enc in requests:
                row = tuple((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                self._continuations[row] = max(self._continuations.get(row, 0), len(continuation_enc))
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._continuations = None

        def _positions_to_keep(self, inps) -> int | None:
            """Positions (from the end of the padded batch) that hold every row's continuation; None: all."""
            if not self._continuations or inps.dim() != 2:
                return None
            width = inps.shape[1]
            first_scored = width
            for row in inps.tolist():
                # Right padding is 0; a row may also end in real 0 tokens, so try every length from the
                # last non-zero token to the full width.
                end = len(row)
                while end > 0 and row[end - 1] == 0:
                    end -= 1
                for length in range(end, width + 1):
                    contlen = self._continuations.get(tuple(row[:length]))
                    if contlen is not None:
                        first_scored = min(first_scored, length - contlen)
                        break
                else:
                    return None
            return width - max(0, first_scored)

        def _model_call(self, inps, attn_mask=None, labels=None):
            keep = self._positions_to_keep(inps) if attn_mask is None and labels is None else None
            if keep is None or keep >= inps.shape[1] or not _accepts_logits_to_keep(self.model):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            import torch

            precision = self.mixed_precision_dtype
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=precision,
                                                 enabled=precision is not None):
                return self.model(inps, logits_to_keep=keep).logits

    return ContinuationLM


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False

# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""Would abandoning a finalist early save anything? From the per-sequence losses an exhaustive run logged
(`screen_ranks.py run exhaustive 0.3 OUT.json`), replay the default's screen (3 finalists of 4 sequences, 16
scored): finalists in screen order, each scored 2 or 4 sequences at a time, stopping once its partial sum exceeds
the best finished total (a sum of non-negative losses only grows, so such a finalist can never win). Prints the
finalist sequence passes saved, of 12 per finalist per step, and whether the winners stay the same; then how often
scoring fewer sequences would change the winner.
    python bench/probes/early_abandon.py OUT.json
"""
import json
import sys

with open(sys.argv[1]) as f:
    data = json.load(f)
per_sequence, steps = data["per_sequence"], len(data["steps"])
candidates = len(per_sequence) // steps
for group in (2, 4):
    saved, same = 0, True
    for s in range(steps):
        losses = per_sequence[s * candidates:(s + 1) * candidates]
        order = sorted(range(candidates), key=lambda i: (sum(losses[i][:4]), i))[:3]
        best, best_i = None, None
        for i in order:
            part, row = sum(losses[i][:4]), 4
            while row < 16 and not (best is not None and part > best):
                part, row = part + sum(losses[i][row:min(16, row + group)]), min(16, row + group)
            saved += 16 - row
            if row == 16 and (best is None or part < best):
                best, best_i = part, i
        same &= best_i == min(order, key=lambda i: (sum(losses[i]), i))
    print(f"groups of {group}: {saved} of {12 * 3 * steps} finalist sequence passes saved; same winners: {same}")

# And fewer scored sequences instead: in how many steps does the winner over the first S differ from the one over 16?
for count in (8, 12):
    changed = sum(
        min(range(candidates), key=lambda i: (sum(per_sequence[s * candidates + i][:count]), i))
        != min(range(candidates), key=lambda i: (sum(per_sequence[s * candidates + i]), i))
        for s in range(steps))
    print(f"winner over the first {count} sequences differs from the winner over 16 in {changed} of {steps} steps")

"""Undo each fix that a reference test guards (issue 11), in a scratch worktree, and run that test: each must FAIL.

A reference test whose reference re-derived the library's own choice would pass with the fix undone; this script
checks that ours do not. Run from the repository root (the scratch worktree is made from HEAD)::

    python scripts/check_reference_tests_catch_reverts.py            # every check
    ONLY=FPR95 python scripts/check_reference_tests_catch_reverts.py # the checks whose name contains FPR95

Exit status 1 when a test still passes with its fix undone.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
CHECKS = [
    ("ImbSAM tail_weight 2 -> 1", [("lightning_lt/optim/sam.py", "        tail_weight: float = 2.0,", "        tail_weight: float = 1.0,"),
                                   ("lightning_lt/callbacks/sam.py", "        tail_weight: float = 2.0,", "        tail_weight: float = 1.0,")],
     "tests/reference/test_imbsam.py"),
    ("SSE-SAM tail_weight 1 -> 2 (ImbSAM's factor)",
     [("lightning_lt/optim/sam.py", "LAST        tail_weight: float = 1.0,", "        tail_weight: float = 2.0,"),
      ("lightning_lt/callbacks/sam.py", "LAST        tail_weight: float = 1.0,", "        tail_weight: float = 2.0,")],
     "tests/reference/test_ssesam.py"),
    ("sampling-free: drop between-threshold anchors, per-image normaliser",
     [("lightning_lt/tasks/detection.py",
       '''    num_foreground = torch.stack([(matched >= 0).sum() for matched in matched_idxs]).sum()  # integer, on device
    loss = F.binary_cross_entropy_with_logits(cls_logits, gt_classes, reduction="sum")
    return loss / (num_foreground + len(matched_idxs))''',
       '''    losses = []
    for i, matched in enumerate(matched_idxs):
        valid = matched != -2
        per = F.binary_cross_entropy_with_logits(cls_logits[i][valid], gt_classes[i][valid], reduction="sum")
        losses.append(per / max(1, int((matched >= 0).sum())))
    return torch.stack(losses).sum() / len(matched_idxs)''')],
     "tests/reference/test_sampling_free.py"),
    ("memory bank placement reference -> random_box",
     [("lightning_lt/callbacks/memory_bank.py", '        placement: Placement = "reference",', '        placement: Placement = "random_box",')],
     "tests/reference/test_memory_bank.py"),
    ("FPR95 nearest -> at_least",
     [("lightning_lt/metrics/ood.py", '        fpr_convention: str = "nearest",', '        fpr_convention: str = "at_least",')],
     "tests/reference/test_fpr95.py"),
    ("EDGE gap over the process's batch only",
     [("lightning_lt/losses/multilabel.py", "    if global_batch:\n        id_scores, oe_scores = all_gather_with_grad", "    if False:\n        id_scores, oe_scores = all_gather_with_grad")],
     "tests/reference/test_edge.py"),
    ("CB focal: no prior bias (auto -> default)",
     [("lightning_lt/tasks/classification.py", 'bias_init = "sigmoid_prior" if head == "linear" and getattr(loss, "sigmoid_outputs", False) else "default"',
       'bias_init = "default"')],
     "tests/reference/test_cb_focal.py"),
]

results = []
ONLY = os.environ.get("ONLY")
for name, patches, test in CHECKS:
    if ONLY and ONLY not in name:
        continue
    if test is None:
        continue
    scratch = Path(tempfile.gettempdir()) / "lightning-lt-revert-check"
    shutil.rmtree(scratch, ignore_errors=True)
    subprocess.run(["git", "-C", str(SRC), "worktree", "add", "-f", "--detach", str(scratch), "HEAD"], check=True, capture_output=True)
    for file, old, new in patches:
        p = scratch / file
        s = p.read_text()
        last = old.startswith("LAST")
        old = old[4:] if last else old
        assert old in s, (name, file)
        if last:
            head, _, tail = s.rpartition(old)
            p.write_text(head + new + tail)
        else:
            p.write_text(s.replace(old, new, 1))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test], cwd=scratch,
                       env={**os.environ, "PYTHONPATH": str(scratch)},
                       capture_output=True, text=True)
    last = (r.stdout.strip().splitlines() or ["?"])[-1] + " | " + " / ".join([l.strip()[:160] for l in r.stdout.splitlines() if l.startswith("E ")][:2])
    results.append((name, test, r.returncode, last))
    print(f"{'FAILS (good)' if r.returncode else 'PASSES (bad)'}: {name}: {test}: {last}", flush=True)
    subprocess.run(["git", "-C", str(SRC), "worktree", "remove", "--force", str(scratch)], capture_output=True)

sys.exit(1 if any(code == 0 for _, _, code, _ in results) else 0)

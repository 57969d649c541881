"""Regenerate examples/*.json from a running server: `python scripts/make_examples.py [URL [FILE ...]]`
(FILE names, e.g. example6_model.json: only those; default every example). example15 (GET /models)
wants a server with two models: `python app.py --random-weights --model a --model b`; the others a
server with the random SAE "demo" and the random Jacobian lens "demo" (`SAE_COMMAND`, `LENS_COMMAND`).

Each file is the server's exact response plus an `_example` field recording the request and the
model that answered (frontends load these as mock data while the server is down).
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

TEXT = "The cat sat on the mat"
IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
EXAMPLES = [
    ("example1_tokenize.json", "/tokenize", {"text": TEXT}),
    ("example2_trace.json", "/trace", {"text": TEXT, "token_indices": [1, 2, 6]}),
    ("example3_predict.json", "/predict", {"text": TEXT, "token_index": 5, "top_k": 5}),
    ("example4_attention_head.json", "/attention", {"text": TEXT, "layer": 2, "head": 1}),
    ("example5_attention_layer.json", "/attention", {"text": TEXT, "layer": 0}),
    ("example6_model.json", "/model", None),
    ("example7_ablate.json", "/ablate", {"text": IOI, "answer": " Mary", "distractor": " John"}),
    ("example8_attribution_patch.json", "/attribution_patch",
     {"clean": IOI, "corrupt": IOI_CORRUPT, "answer": " Mary", "distractor": " John", "site": "heads", "compare": True}),
    ("example10_lens.json", "/lens", {"text": TEXT, "target": " mat", "top_k": 3}),
    ("example11_score.json", "/score", {"texts": [TEXT, "The cat sat on the hat"], "temperature": 0.7, "top_k": 3}),
    ("example12_dla.json", "/dla", {"text": TEXT, "answer": " mat", "distractor": " floor"}),
    ("example13_patch.json", "/patch",
     {"clean": IOI, "corrupt": IOI_CORRUPT, "answer": " Mary", "distractor": " John", "site": "resid_pre"}),
    ("example14_causal_trace.json", "/causal_trace",
     {"text": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "answer": " Paris", "kind": "mlp",
      "samples": 4}),
    ("example15_models.json", "/models", None),
    ("example16_generate.json", "/generate", {"prompt": "The Eiffel Tower is in the city of", "max_new_tokens": 8,
                                              "alternatives": 3}),
    ("example17_generate_steered.json", "/generate",
     {"prompt": "I think that you are", "max_new_tokens": 6, "alternatives": 2, "compare": True,
      "steer": [{"layer": 2, "vector": {"kind": "actadd", "positive": "Love", "negative": "Hate"}, "coefficient": 5}]}),
    ("example18_steering_vector.json", "/steering_vector",
     {"layer": 2, "vector": {"kind": "actadd", "positive": "Love", "negative": "Hate"}, "top_k": 5}),
    ("example19_features.json", "/features", {"text": TEXT, "sae": "demo", "top_k": 3}),
    ("example20_feature.json", "/feature", {"text": IOI, "sae": "demo", "index": 1900, "top_k": 3, "answer": " Mary",
                                            "distractor": " John", "edit": "ablate", "indices": [1900, 482, 7]}),
    ("example21_saes.json", "/saes", None),
    ("example22_lens_jacobian.json", "/lens", {"text": TEXT, "target": " mat", "top_k": 3, "lens": "jacobian"}),
]
# The SAE and the Jacobian lens the examples read, both random on GPT-2 small's shape:
# `python app.py --random-weights --sae name=demo,DIR --jlens LENS_DIR/demo.pt`.
SAE_COMMAND = ("from model_utils import write_random_sae; write_random_sae(DIR, d_in=768, d_sae=4096, "
               "hook='blocks.6.hook_resid_pre', scale=6.3, seed=6)")
LENS_COMMAND = ("import torch; from transformer_lens.tools.analysis import JacobianLens; from explorer.runtime import "
                "jlens; torch.manual_seed(0); jlens.save(JacobianLens({l: torch.eye(768) + 0.02 * torch.randn(768, 768) "
                "for l in range(11)}, n_prompts=1, d_model=768), LENS_DIR, 'demo')")
# Jobs: the file is the finished job (GET /jobs/{id}), the request the POST that started it.
JOB_EXAMPLES = [
    ("example9_chg_job.json", "/jobs/chg", {"texts": [IOI, "When Tom and Anna went to the park, Anna gave a ball to"],
                                            "targets": [" Mary", " Tom"]}),
]
OUT = Path(__file__).resolve().parent.parent / "examples"


def fetch(url: str, body: dict | None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


def finished_job(url: str, body: dict) -> dict:
    """Start a job (POST url) and poll it until it ends; its final GET /jobs/{id} answer."""
    job = fetch(url, body)["job"]
    base = url[:url.index("/jobs/")]
    while (state := fetch(f"{base}/jobs/{job}", None))["status"] not in ("done", "error", "cancelled"):
        time.sleep(1)
    return state


def main(base: str = "http://127.0.0.1:5001", *only: str) -> None:
    model = fetch(base + "/model", None)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    examples = [(*e, fetch) for e in EXAMPLES] + [(*e, finished_job) for e in JOB_EXAMPLES]
    unknown = set(only) - {e[0] for e in examples}
    if unknown:
        sys.exit(f"no example named {', '.join(sorted(unknown))}")
    examples = [e for e in examples if not only or e[0] in only]
    for name, path, body, get in examples:
        response = get(base + path, body)
        response["_example"] = {
            "request": {"method": "GET" if body is None else "POST", "path": path, "body": body},
            "model": model["name"], "weights": model["weights"], "generated": made,
            "note": "random weights: shapes are real, predictions are noise; regenerate with real "
                    "GPT-2 (python app.py, then this script)" if model["weights"] == "random" else "",
        }
        (OUT / name).write_text(json.dumps(response, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote examples/{name}")


if __name__ == "__main__":
    main(*sys.argv[1:])

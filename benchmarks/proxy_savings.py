"""What the compressing proxy saves: tokens sent upstream before and after, on real RAG-style chats.

A real ``ctxpress serve --upstream`` app (the embedded model compressing) is
put in front of a stand-in upstream that records each request; the official
``openai`` client sends multi-document QA chats built from the evaluation
data (report split of ``nq``: a system instruction, then one user message
with the passages and the question). Printed per policy: the prompt tokens
before and after (the compressor's tokenizer, as ``usage.ctxpress`` reports
them), the fraction saved, whether the gold answer still reaches the
upstream (answer survival, with a bootstrap interval), whether the question
arrived whole, and the proxy's compression seconds per request.

    .venv/bin/python benchmarks/proxy_savings.py --examples 50
"""

import argparse
import json
import sys
import time

from common import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=50, help="chats sent per policy (default 50)")
    parser.add_argument("--rates", default="0.5,0.33", help="policies: kept fractions (default 0.5,0.33)")
    parser.add_argument("--documents", type=int, default=5, help="passages per question (default 5)")
    parser.add_argument("--data-dir", help="evaluation data (default: $CTXPRESS_DATA or ../shared/data)")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import openai
    from tqdm import tqdm
    from upstream import recording_upstream

    from ctxpress.bench.data import find_data_dir
    from ctxpress.bench.stats import bootstrap_mean
    from ctxpress.bench.tasks import NQ
    from ctxpress.errors import InputError
    from ctxpress.models import load_model
    from ctxpress.proxy import Upstream
    from ctxpress.request import PromptRequest
    from ctxpress.server import create_app, serving

    try:
        data = find_data_dir(args.data_dir, ["nq"])
    except InputError as exc:
        sys.exit(f"proxy_savings: {exc}")
    lm = load_model(args.model)
    examples = NQ(documents=args.documents, gold_positions=(0, 2, 4)).examples(
        data, args.examples, seed=0, tokenizer=lm.tokenizer, split="report")

    seen: list[dict] = []
    upstream = recording_upstream(seen)

    rows = []
    with serving(upstream) as upstream_url:
        for rate in [float(r) for r in args.rates.split(",")]:
            app = create_app(lm, upstream=Upstream(upstream_url + "/v1"), policy=PromptRequest(rate=rate))
            before = after = 0
            survived, questions, seconds = [], 0, 0.0
            with serving(app) as proxy_url:
                client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused", max_retries=0)
                for example in tqdm(examples, desc=f"rate {rate:g}", file=sys.stderr):
                    start = time.perf_counter()
                    reply = client.chat.completions.create(model="upstream", messages=[
                        {"role": "system", "content": example.instruction},
                        {"role": "user", "content": f"{example.context}\n\n{example.question}"}])
                    seconds += time.perf_counter() - start
                    usage = reply.usage.model_extra["ctxpress"]
                    before += usage["prompt_tokens_before"]
                    after += usage["prompt_tokens_after"]
                    sent = seen[-1]["messages"][1]["content"]
                    survived.append(example.survives(sent))
                    questions += sent.endswith(example.question)
            kept = bootstrap_mean(survived)
            rows.append([f"{rate:g}", len(examples), before, after, f"{1 - after / before:.2f}",
                         f"{kept.mean:.2f} [{kept.low:.2f}, {kept.high:.2f}]", f"{questions}/{len(examples)}",
                         f"{seconds / len(examples):.2f}"])
    print(markdown_table(["rate", "chats", "tokens before", "tokens after", "saved", "answer survives",
                          "question whole", "s per request"], rows))
    print(json.dumps({"model": lm.name, "documents": args.documents, "rows": rows}))


if __name__ == "__main__":
    main()

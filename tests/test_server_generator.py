"""docs/grpo.md's external-generation-server example, run against a stub OpenAI-compatible
server on 127.0.0.1 that samples with the tiny model (greedy: the texts are known)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.generation import HFGenerator, LeanGenerator, SamplingConfig
from lit_align.models import PolicyConfig
from lit_align.modules.grpo_config import GRPOSamplingConfig

GRPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "grpo.md"
PROMPTS = ["Tell me about the sea.", "hi"]


def doc_example() -> dict:
    block = re.search(r"### An external generation server.*?```python\n(.*?)```", GRPO_DOC.read_text(), re.S)
    assert block, "docs/grpo.md lost its external generation server example"
    namespace: dict = {}
    exec(compile(block.group(1), str(GRPO_DOC), "exec"), namespace)
    return namespace


def checksum(model) -> float:
    return float(sum(p.double().abs().sum() for p in model.parameters()))


class Stub(ThreadingHTTPServer):
    """POST /v1/completions with token-id prompts; samples with `model` through LeanGenerator."""

    def __init__(self, model, tokenizer):
        super().__init__(("127.0.0.1", 0), Handler)
        self.model, self.tokenizer = model, tokenizer
        self.requests: list[dict] = []
        self.weights_seen: list[float] = []  # a checksum of the model at every request
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def complete(self, body: dict) -> dict:
        sampling = SamplingConfig(body["max_tokens"], body["temperature"], body["top_p"], body["top_k"],
                                  body["repetition_penalty"])
        ids = torch.tensor([body["prompt"]])
        with self.lock:
            self.requests.append(body)
            self.weights_seen.append(checksum(self.model))
            out = LeanGenerator(self.model, self.tokenizer).generate_ids(ids, torch.ones_like(ids), sampling, body["n"],
                                                                       body["seed"])
        choices = []
        for i, (row, mask, cut) in enumerate(zip(out.completion_ids, out.completion_mask, out.truncated)):
            kept = row[: int(mask.sum()) - (0 if cut else 1)]  # the text stops before EOS
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            choices.append({"index": i, "text": text, "finish_reason": "length" if cut else "stop"})
        return {"object": "text_completion", "choices": choices[::-1]}  # any order: the client sorts


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/v1/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        payload = json.dumps(self.server.complete(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = Stub(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_server_completions_equal_local_greedy_decoding(stub, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = stub.tokenizer
    gen = doc_example()["ServerGenerator"](stub.url, "policy", tok)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    ids, mask = gen.encode_prompts(PROMPTS)
    assert (mask == 0).any()  # left padding: the client must send each prompt without it
    got = gen.generate_ids(ids, mask, greedy, num_return_sequences=2, generator_seed=7)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    want = HFGenerator(model, tok).generate_ids(ids, mask, greedy, 1)  # transformers' greedy, once per prompt
    assert got.texts == [t for t in want.texts for _ in range(2)] and any(want.texts)
    assert torch.equal(got.truncated, want.truncated.repeat_interleave(2))
    assert torch.equal(got.prompt_ids, ids.repeat_interleave(2, 0)) and got.completion_ids.shape[0] == 4
    for row, m, text in zip(got.completion_ids, got.completion_mask, got.texts):
        assert tok.decode(row[: int(m.sum())], skip_special_tokens=True) == text
    assert [r["prompt"] for r in stub.requests] == [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert {(r["n"], r["max_tokens"], r["temperature"], r["seed"]) for r in stub.requests} == {(2, 12, 0.0, 7)}
    # generate(prompts) for scripts goes through the same call
    assert gen.generate(PROMPTS, greedy, num_return_sequences=2, seed=7, progress=False) == got.texts


def test_a_completion_the_server_stopped_ends_in_eos(stub, tiny_model_dir):
    """Sampled (seed 3 makes some completions stop within 16 tokens): the client marks them with
    EOS and not as truncated, as the sampler the stub runs does for each prompt on its own."""
    from transformers import AutoModelForCausalLM

    tok = stub.tokenizer
    gen = doc_example()["ServerGenerator"](stub.url, "policy", tok)
    sampled = SamplingConfig(max_new_tokens=16, temperature=1.0)
    got = gen.generate_ids(*gen.encode_prompts(PROMPTS), sampled, num_return_sequences=2, generator_seed=3)
    local = LeanGenerator(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok)
    want = [local.generate_ids(*local.encode_prompts([p]), sampled, 2, 3) for p in PROMPTS]
    assert got.texts == [t for w in want for t in w.texts]
    assert torch.equal(got.truncated, torch.cat([w.truncated for w in want]))
    assert (~got.truncated).any() and got.truncated.any()
    for row, m, cut in zip(got.completion_ids, got.completion_mask, got.truncated):
        assert (row[int(m.sum()) - 1] == tok.eos_token_id) == (not cut)


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def grpo_fit(namespace: dict, stub, tiny_model_dir, tmp_path, max_steps: int = 2):
    data_path = tmp_path / "prompts.jsonl"
    data_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    from lit_align.data.datamodule import AlignDataModule

    data = AlignDataModule(str(data_path), mode="prompts", val_fraction=0.0, batch_size=2, shuffle=False,
                           max_prompt_length=32)
    module_class = namespace["ServerGRPO"]
    module_class.url = stub.url
    module = module_class(PolicyConfig(name_or_path=str(tiny_model_dir)), reward_funcs=[length_reward],
                          sampling=GRPOSamplingConfig(num_generations=2, max_new_tokens=8, temperature=1.0),
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return module


def test_grpo_refuses_to_train_until_weights_are_pushed(stub, tiny_model_dir, tmp_path):
    with pytest.raises(NotImplementedError, match="push `model`'s weights to the server"):
        grpo_fit(doc_example(), stub, tiny_model_dir, tmp_path)
    assert stub.requests == []  # refused before sampling stale weights


def test_grpo_trains_on_server_samples_of_the_pushed_weights(stub, tiny_model_dir, tmp_path):
    namespace = doc_example()

    pushed: list[float] = []

    class PushingGenerator(namespace["ServerGenerator"]):
        def sync_weights(self, model):  # the stub shares this process: load the weights into it
            pushed.append(checksum(model))
            stub.model.load_state_dict(model.state_dict())

    namespace["ServerGenerator"] = PushingGenerator  # what ServerGRPO.setup builds
    module = grpo_fit(namespace, stub, tiny_model_dir, tmp_path)
    assert isinstance(module.generator, PushingGenerator)
    assert len(stub.requests) == 4 and {r["n"] for r in stub.requests} == {2}  # 2 steps x 2 prompts, G = 2
    assert len(pushed) == 2 and pushed[0] != pushed[1]  # step 1 trained the policy
    # every request of step s sampled with the weights pushed before step s
    assert stub.weights_seen == [pushed[0], pushed[0], pushed[1], pushed[1]]
    assert checksum(module.policy) != pushed[1]  # and step 2 trained it again


def test_the_server_generator_refuses_a_dtype_it_cannot_set(stub):
    gen = doc_example()["ServerGenerator"](stub.url, "policy", stub.tokenizer)
    with pytest.raises(ValueError, match="sampling.dtype: the server samples with the weights it loaded"):
        gen.generate_ids(*gen.encode_prompts(PROMPTS), SamplingConfig(max_new_tokens=4, dtype="bfloat16"))
    assert stub.requests == []

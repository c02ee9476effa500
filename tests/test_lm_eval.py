"""task=lm_eval: our model behind lm-evaluation-harness's LM interface, against the harness's own HFLM on
transformers' Phi3ForCausalLM with the same weights, on local task yamls (the harness's format) whose JSONL
data the tests write; rolling windows against a plain forward; batched against one by one."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from test_generate import save_tiny_tokenizer
from test_phi3 import save_phi3
from variants import TransformerLM

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from runner.lm_eval.model import HarnessTokenizer, VariantsLM  # noqa: E402

QUESTIONS = [("def fibonacci(n):\n    return", [" n", " os", " fibonacci(n - 1)"], 2),
             ("import", [" os", " n", "("], 0),
             ("return n if n <", [" 2", " os", " import"], 0),
             ("def f", ["ibonacci(n):", "(x):", " os"], 1),
             ("if n < 2 else", [" fibonacci(n - 1)", " import os", " def"], 0),
             ("", [" import os", " def fibonacci(n):"], 1)]  # an empty context: the prefix token stands in
TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n" * 3, "import os\n", "fib fib os n\n"]


def write_tasks(directory):
    """Two task yamls in the harness's own format, over JSONL files: multiple choice and loglikelihood_rolling."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "choice.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    with open(directory / "text.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    (directory / "tiny_choice.yaml").write_text(task_yaml(
        "tiny_choice", directory / "choice.jsonl", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (directory / "tiny_text.yaml").write_text(task_yaml(
        "tiny_text", directory / "text.jsonl", "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"))
    return directory


def task_yaml(name, data_file, body) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            f"test_split: test\n{body}metadata:\n  version: 2.0\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Phi-3 (300 ids) with a tiny byte-level BPE saved beside it, as a checkpoint's own."""
    path, hf = save_phi3(tmp_path_factory.mktemp("phi3"), vocab_size=300, max_position_embeddings=64)
    save_tiny_tokenizer(path)
    return path, hf


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def ours(path, batch_size=4, max_length=None):
    tok = AutoTokenizer.from_pretrained(path)
    return VariantsLM(TransformerLM.from_hf(path), HarnessTokenizer.from_hf(tok, str(path)), batch_size=batch_size,
                      max_length=max_length)


def theirs(path, hf, batch_size=4, max_length=None):
    return HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=batch_size,
                max_length=max_length)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_matches_the_harness_on_transformers(checkpoint):
    path, hf = checkpoint
    pairs = requests("loglikelihood", [(q, c) for q, choices, _ in QUESTIONS for c in choices])
    mine, reference = ours(path).loglikelihood(pairs), theirs(path, hf).loglikelihood(pairs)
    assert [g for _, g in mine] == [g for _, g in reference]
    assert max(abs(a - b) for (a, _), (b, _) in zip(mine, reference)) < 1e-4
    assert len({round(v, 3) for v, _ in mine}) > len(mine) // 2  # the values differ: a real comparison


def test_rolling_windows_match_the_harness_and_a_plain_forward(checkpoint):
    path, hf = checkpoint
    tok = AutoTokenizer.from_pretrained(path)
    texts = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    assert len(tok.encode(TEXTS[0])) > 40  # longer than the 16-token windows below: several windows
    mine = ours(path, max_length=16).loglikelihood_rolling(texts)
    assert mine == pytest.approx(theirs(path, hf, max_length=16).loglikelihood_rolling(texts), abs=1e-4)
    # the harness's rule, computed by hand: every token predicted once, from at most 16 tokens before it
    # (end-of-text first), the first window from the start and later ones the last 16 tokens before their end
    for text, value in zip(TEXTS, mine):
        ids = [tok.eos_token_id] + tok.encode(text)
        expected, windows = 0.0, {}
        for target in range(1, len(ids)):
            end = _window_end(target, len(ids))
            if end not in windows:
                with torch.no_grad():
                    windows[end] = F.log_softmax(hf(torch.tensor([ids[max(0, end - 16):end]])).logits[0].float(), -1)
            expected += windows[end][target - 1 - max(0, end - 16), ids[target]].item()
        assert value == pytest.approx(expected, abs=1e-4)
    # a text that fits in one window is one forward pass
    whole = ours(path).loglikelihood_rolling(texts[1:2])[0]
    ids = [tok.eos_token_id] + tok.encode(TEXTS[1])
    with torch.no_grad():
        lp = F.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert whole == pytest.approx(sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)), abs=1e-4)


def _window_end(target: int, n: int, size: int = 16) -> int:
    """The input window that predicts ids[target] ends (exclusive) at the end of its chunk of `size` predictions;
    the last chunk's window still reads `size` tokens, ending at the text's end."""
    chunk_end = ((target - 1) // size + 1) * size  # predictions 1..16 come from window 0..15, and so on
    return min(chunk_end, n - 1)


def test_batched_requests_of_unequal_length_equal_one_by_one(checkpoint):
    path, _ = checkpoint
    pairs = requests("loglikelihood", [(q, c) for q, choices, _ in QUESTIONS for c in choices])
    texts = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    batched, single = ours(path, batch_size=8, max_length=16), ours(path, batch_size=1, max_length=16)
    for (a, ga), (b, gb) in zip(batched.loglikelihood(pairs), single.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    assert batched.loglikelihood_rolling(texts) == pytest.approx(single.loglikelihood_rolling(texts), abs=1e-4)
    prompts = requests("generate_until", [(q, {"until": ["\n"], "max_gen_toks": 8}) for q, _, _ in QUESTIONS[:4]])
    assert ours(path, batch_size=4).generate_until(prompts) == ours(path, batch_size=1).generate_until(prompts)


def test_generate_until_matches_the_harness_on_transformers(checkpoint):
    path, hf = checkpoint
    prompts = requests("generate_until", [(q, {"until": ["("], "max_gen_toks": 10}) for q, _, _ in QUESTIONS[:5]])
    generated = ours(path).generate_until(prompts)
    assert generated == theirs(path, hf).generate_until(prompts)
    assert any(generated) and not any("(" in g for g in generated)


def test_local_tasks_give_the_harness_scores_through_run_py(monkeypatch, checkpoint, tasks_dir, tmp_path):
    """task=lm_eval on the checkpoint: the accuracy and the perplexities of HFLM on Phi3ForCausalLM."""
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from runner.lm_eval import main
    path, hf = checkpoint
    record = main(compose(["task=lm_eval", "model=phi3", f"model.checkpoint={path}", "logger=none",
                           f"lm_eval.include_path={tasks_dir}", "lm_eval.tasks=[tiny_choice,tiny_text]",
                           "lm_eval.bootstrap_iters=10"]))
    reference = simple_evaluate(model=theirs(path, hf), tasks=["tiny_choice", "tiny_text"], log_samples=False,
                                task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                bootstrap_iters=10)["results"]
    got = record["metrics"]["lm_eval"]
    assert record["status"] == "ok"
    assert json.loads((Path(record["output_dir"]) / "results.json").read_text())["metrics"] == record["metrics"]
    for metric in ("acc", "acc_norm"):
        assert got["tiny_choice"][metric] == reference["tiny_choice"][f"{metric},none"]
        assert got["tiny_choice"][f"{metric}_stderr"] == pytest.approx(
            reference["tiny_choice"][f"{metric}_stderr,none"])
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got["tiny_text"][metric] == pytest.approx(reference["tiny_text"][f"{metric},none"], rel=1e-5)
    assert record["lm_eval"]["version"] == lm_eval.__version__
    assert record["lm_eval"]["task_versions"] == {"tiny_choice": 2.0, "tiny_text": 2.0}


def test_trained_weights_and_the_project_tokenizer_against_a_naive_scorer(monkeypatch, tmp_path, tasks_dir):
    """eval.weights (a training run) with the run's BPE: the accuracy of picking argmax_choice log p(choice | question),
    summed by hand from one forward over question + choice (an empty question: end-of-text stands in)."""
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    from runner.build import build_model
    from runner.checkpoint import save_checkpoint
    from runner.data import build_data
    from runner.lm_eval import main
    overrides = ["task=lm_eval", "model=mqa_rope", "model.d_model=32", "model.n_layers=1", "data.max_documents=40",
                 "tokenizer.vocab_size=300", "data.seq_len=32", f"cache_dir={tmp_path / 'cache'}", "logger=none",
                 f"eval.weights={tmp_path / 'run'}", f"lm_eval.include_path={tasks_dir}", "lm_eval.tasks=[tiny_choice]",
                 "lm_eval.bootstrap_iters=0"]
    torch.manual_seed(123)
    trained = build_model(compose(overrides).model).eval()
    save_checkpoint(tmp_path / "run", 6, {"model": trained.state_dict()})
    record = main(compose(overrides))
    assert record["weights"].startswith("training checkpoint")
    tok = build_data(compose(overrides)).tokenizer
    correct = 0
    for question, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            context = tok.encode(question) if question else [tok.eot_id]
            ids = tok.encode(question + choice) if question else [tok.eot_id] + tok.encode(choice)
            with torch.no_grad():
                lp = F.log_softmax(trained(torch.tensor([ids[:-1]]))[0].float(), -1)
            scores.append(sum(lp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
    assert record["metrics"]["lm_eval"]["tiny_choice"]["acc"] == correct / len(QUESTIONS)


class RecordingLogger:
    def __init__(self):
        self.values = {}

    def summary(self, values):
        self.values.update(values)

    def log_table(self, key, rows):
        pass

    def finish(self, status):
        pass


def test_random_preset_the_wandb_summary_and_the_compare_report_column(monkeypatch, tmp_path, tasks_dir, checkpoint):
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    import runner.task
    from runner.lm_eval import main
    logger = RecordingLogger()
    monkeypatch.setattr(runner.task, "start_logger", lambda cfg, results: logger)
    from runner.report.build import build_report
    from runner.report.runs import gather
    path, _ = checkpoint
    record = main(compose(["task=lm_eval", "model=gqa_rope", "model.d_model=32", "model.n_layers=1", "tokenizer=hf",
                           f"tokenizer.name_or_path={path}", f"lm_eval.include_path={tasks_dir}",
                           "lm_eval.tasks=[tiny_choice]", "lm_eval.limit=4"]))
    record = json.loads((Path(record["output_dir"]) / "results.json").read_text())
    assert record["status"] == "ok" and "random weights" in record["weights"]
    assert record["lm_eval"]["n_samples"]["tiny_choice"]["effective"] == 4
    scores = record["metrics"]["lm_eval"]["tiny_choice"]
    assert {k: v for k, v in logger.values.items() if k.startswith("lm_eval/")} == {
        f"lm_eval/tiny_choice/{k}": v for k, v in scores.items()}  # flat keys, one number each
    runs = gather([tmp_path])
    report = build_report(runs, [tmp_path])
    assert ("lm_eval/tiny_choice/acc", "tiny_choice acc") in report["metric_columns"]
    assert runs[0]["lm_eval/tiny_choice/acc"] == record["metrics"]["lm_eval"]["tiny_choice"]["acc"]


def test_metric_names_keep_a_filter_before_the_stderr():
    from runner.lm_eval import harness_metrics
    out = {"results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                               "acc,none": 1, "word_perplexity_stderr,none": "N/A"}}}
    assert harness_metrics(out) == {"gsm": {"exact_match_strict-match": 0.5, "exact_match_strict-match_stderr": 0.1,
                                            "acc": 1.0, "word_perplexity_stderr": None}}


def test_without_the_harness_the_task_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    import runner.data
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.setattr(runner.data, "build_data", lambda *a: pytest.fail("data read before the harness check"))
    from runner.lm_eval import main
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        main(compose(["task=lm_eval", "lm_eval.tasks=[x]", "logger=none"]))


@pytest.mark.parametrize("override, message", [("lm_eval.tasks=[]", r"lm_eval\.tasks is empty"),
                                               ("lm_eval.include_path=/no/such/dir", r"lm_eval\.include_path"),
                                               ("lm_eval.batch_size=0", r"lm_eval\.batch_size")])
def test_bad_requests_fail_before_any_work(monkeypatch, tmp_path, override, message):
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    import runner.data
    monkeypatch.setattr(runner.data, "build_data", lambda *a: pytest.fail("data read before the config check"))
    from runner.lm_eval import main
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(compose(["task=lm_eval", "lm_eval.tasks=[x]", override, "logger=none"]))

"""Packing efficiency: rows hold whole samples spread evenly, and training computes no padding column
that a whole micro-batch shares (packing.pack_samples, packing.collate_rows)."""
import random

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import config
import data_io
import dataset
import packing
import train_step
from conftest import REPO, run_script


def random_samples(rng, count, max_length):
    samples = []
    for index in range(count):
        length = min(max_length, int(rng.lognormvariate(5.5, 0.9)) + 2)
        ids = [3 + (index * 7 + j) % 97 for j in range(length)]
        samples.append((ids, [packing.IGNORE_INDEX] + ids[1:]))
    return samples


def test_rows_hold_every_sample_whole_once_in_as_few_rows_as_best_fit():
    spread = 0
    for seed in range(6):
        for count in (40, 300):      # 40: rows with room to spare; 300: best fit fills them, nothing to spread
            rng = random.Random(seed)
            samples = random_samples(rng, count, 1024)
            packed = packing.pack_samples(samples, 1024, pad_token_id=0)
            lengths = [len(ids) for ids, _ in samples]
            assert len(packed["input_ids"]) == len(packing._best_fit_rows(lengths, 1024))
            found, loads = [], []
            for ids, labels, mask, starts in zip(packed["input_ids"], packed["labels"], packed["attention_mask"],
                                                 packed["sample_starts"]):
                assert len(ids) == len(labels) == len(mask) == 1024
                real = sum(mask)
                assert mask == [1] * real + [0] * (1024 - real)
                bounds = list(starts) + [real]
                for begin, end in zip(bounds[:-1], bounds[1:]):
                    found.append((tuple(ids[begin:end]), tuple(labels[begin:end])))
                if len(starts) > 1:
                    loads.append(real)
            assert sorted(found) == sorted((tuple(i), tuple(l)) for i, l in samples)
            if packing._balanced_rows(lengths, len(packed["input_ids"]), 1024) is not None:
                spread += 1
                # spread evenly: rows of several samples within one mean sample length of each other
                # (a row with one long sample cannot shrink)
                assert max(loads) - min(loads) <= sum(lengths) / len(lengths), loads
    assert spread >= 4


def test_reused_lists_give_the_same_rows_without_copying_the_first_sample():
    """pack_samples(reuse_lists=True) (convert_data's: it has no further use for the samples) builds each
    row in its first sample's own lists: the same rows as copies would give."""
    samples = random_samples(random.Random(3), 300, 1024)
    copied = packing.pack_samples(samples, 1024, pad_token_id=0)
    owned = [(list(ids), list(labels)) for ids, labels in samples]
    reused = packing.pack_samples(owned, 1024, pad_token_id=0, reuse_lists=True)
    assert reused == copied
    firsts = {id(ids) for ids, _ in owned} & {id(row) for row in reused["input_ids"]}
    assert len(firsts) == len(reused["input_ids"])     # every row is one of the samples' lists


def test_full_data_falls_back_to_best_fit_rows():
    """Samples that fill their rows completely cannot be spread: the best-fit rows are kept."""
    samples = [([5] * n, [5] * n) for n in (60, 40, 70, 30, 100, 100)]
    packed = packing.pack_samples(samples, 100, pad_token_id=0)
    assert sorted(sum(m) for m in packed["attention_mask"]) == [100, 100, 100, 100]


def test_cut_micro_batch_gives_the_same_loss(tiny_model_dir, tiny_tokenizer):
    """Cutting a micro-batch to its longest row changes nothing the loss sees."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rng = random.Random(0)
    samples = [([3 + (7 * i + j) % 500 for j in range(n)], [packing.IGNORE_INDEX] * 3 + [9] * (n - 3))
               for i, n in enumerate([rng.randint(20, 90) for _ in range(9)])]
    packed = packing.pack_samples(samples, 256, pad_token_id=0)
    rows = dataset.PackedRows()
    rows.input_ids, rows.labels = packed["input_ids"], packed["labels"]
    rows.attention_mask, rows.sample_starts, rows.max_length = packed["attention_mask"], packed["sample_starts"], 256
    items = [rows[i] for i in range(len(rows))]
    assert len(items) >= 2
    cut = packing.collate_rows(items)
    full = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    longest = max(sum(m) for m in packed["attention_mask"])
    assert cut["input_ids"].shape[1] == packing.fed_length(longest, 256) < 256
    assert cut["input_ids"].shape[1] % config.ROW_LENGTH_MULTIPLE == 0
    with torch.no_grad():
        cut_sum, cut_count = train_step.forward_loss_sum(model, cut, "sdpa", torch.float32)
        full_sum, full_count = train_step.forward_loss_sum(model, full, "sdpa", torch.float32)
    assert cut_count == full_count > 0
    assert abs(float(cut_sum) - float(full_sum)) < 1e-3 * abs(float(full_sum)) / full_count


def test_sample_data_at_2048_trains_on_99_percent_real_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Issue 8, point 4: at max_length 2048 the sample data's training micro-batches are >= 99% real tokens."""
    result = run_script(["code/convert_data.py", "--tokenizer", tiny_model_dir, "--max_length", "2048",
                         "--data_file", f"{REPO}/data/test/ift_data.pkl", "--out_data_path", str(tmp_path)],
                        check=True)
    datas = data_io.safe_load_pickle(tmp_path / "llama_ift_data_ids.pkl")
    counts = datas["meta"]["counts"]
    assert f"{100 * counts['real_token_share']:.2f}% of the positions training computes are real" in result.stdout
    # the rows are far from full (the data fills 17 of them and a bit): full rows would be mostly padding
    assert counts["real_token_share_of_full_rows"] < 0.97
    rows = dataset.DatasetIds(tiny_tokenizer, datas, 2048)
    micro_batch = config.DS_CONFIG_lora["train_micro_batch_size_per_gpu"]
    real = fed = 0
    for epoch in range(8):    # the pairs of rows change with the shuffle of every epoch
        sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=config.TRAIN_SEED)
        sampler.set_epoch(epoch)
        for batch in DataLoader(rows, batch_size=micro_batch, sampler=sampler, collate_fn=packing.collate_rows):
            real += int(batch["attention_mask"].sum())
            fed += batch["input_ids"].numel()
    assert real == 8 * counts["real_tokens"]
    assert real / fed >= 0.99, real / fed


def test_dialogue_datasets_tokenize_at_start_up_like_convert_data(tiny_tokenizer):
    """--dataset_type GPT2Dataset_onlyres (packed) and BertDataset_onlyres (one padded dialogue per row) build
    their rows from a dialogue file with the same tokenization and truncation as convert_data.py."""
    dialogues = data_io.load_dialogues(f"{REPO}/data/test/ift_data.pkl")
    expected = dataset.tokenize_samples(tiny_tokenizer, dialogues, "zh", random.Random(3))
    kept, truncated, dropped, _ = dataset.truncate_samples(expected, 256)
    rows = dataset.BertDataset_onlyres(tiny_tokenizer, dialogues, 256, template="zh", seed=3)
    assert (len(rows), rows.truncated, rows.dropped) == (len(kept), truncated, dropped) and truncated > 0
    for index in (0, len(rows) - 1):
        item, (ids, labels) = rows[index], kept[index]
        assert item["input_ids"][:len(ids)].tolist() == ids and item["labels"][:len(ids)].tolist() == labels
        assert int(item["attention_mask"].sum()) == len(ids) and set(item["labels"][len(ids):].tolist()) <= {-100}
    packed = dataset.GPT2Dataset_onlyres(tiny_tokenizer, dialogues, 1024, template="zh", seed=3)
    rng = random.Random(3)
    grouped = dataset.group_dialogues(dialogues, config.MAX_DIALOGUES_PER_SAMPLE, rng)
    kept, truncated, dropped, _ = dataset.truncate_samples(dataset.tokenize_samples(tiny_tokenizer, grouped, "zh", rng),
                                                           1024)
    assert (packed.truncated, packed.dropped) == (truncated, dropped) and 0 < len(packed) < len(dialogues)
    assert sum(sum(mask) for mask in packed.attention_mask) == sum(len(ids) for ids, _ in kept)
    assert sum(len(starts) for starts in packed.sample_starts) == len(kept)

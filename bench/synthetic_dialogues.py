"""Synthetic dialogues for bench/bench_convert.py: fragments written for the benchmark, recombined by a
seeded rng into a Chinese/English mix of 1-5 turns, some turns with an input."""
import json
import random

ZH = {
    "subject": ["我们", "这个项目", "小王", "研究小组", "一位老师", "这家小公司", "城市里的居民", "学生们",
                "新来的同事", "图书馆", "社区医院", "我的邻居"],
    "verb": ["需要改进", "希望了解", "正在讨论", "计划整理", "仔细分析了", "重新安排了", "比较了", "记录了",
             "总结了", "关心"],
    "object": ["数据的质量", "明天的天气", "三种不同的方案", "一份详细的报告", "下学期的课程", "旅行的路线",
               "实验的结果", "健康的饮食习惯", "程序的结构", "古代的诗歌", "家里的预算", "公园的绿化"],
    "adverbial": ["在过去的一年里", "为了节省时间", "经过仔细的思考", "按照老师的建议", "在周末的时候",
                  "从长远来看", "和大家商量以后", "趁着天气好"],
    "reason": ["因为这样更加清楚", "所以结果更可靠", "但是还需要更多数据", "而且成本不高", "这样大家都能参与"],
    "question": ["请解释{object}。", "怎样才能{verb}{object}？", "{subject}为什么{verb}{object}？",
                 "请列出{n}条关于{object}的建议。", "{subject}{adverbial}应该怎么做？", "用一句话概括{object}。",
                 "请根据下面的内容回答问题。", "下面这段话的主要意思是什么？"],
}
EN = {
    "subject": ["We", "The team", "My brother", "A small company", "The students", "Our teacher", "The city council",
                "A new colleague", "The library", "Everyone in the village"],
    "verb": ["improved", "discussed", "planned", "measured", "compared", "wrote down", "summarized", "reviewed",
             "changed", "explained"],
    "object": ["the quality of the data", "the weather tomorrow", "three different plans", "a detailed report",
               "the course schedule", "the travel route", "the test results", "healthy eating habits",
               "the structure of the program", "an old poem", "the family budget", "the new park"],
    "adverbial": ["last year", "to save time", "after some careful thought", "as the teacher suggested",
                  "on the weekend", "in the long run", "after talking with everyone", "while the weather was good"],
    "reason": ["because it makes things clearer", "so the result is more reliable", "but more data is needed",
               "and it does not cost much", "so that everyone can take part"],
    "question": ["Explain {object}.", "How can we improve {object}?", "Why did {subject_l} review {object}?",
                 "List {n} ideas about {object}.", "What should {subject_l} do {adverbial}?",
                 "Summarize {object} in one sentence.", "Answer the question using the text below.",
                 "What is the main point of the following passage?"],
}


def _fill(rng, words, template):
    subject = rng.choice(words["subject"])
    return template.format(subject=subject, subject_l=subject[0].lower() + subject[1:], verb=rng.choice(words["verb"]),
                           object=rng.choice(words["object"]), adverbial=rng.choice(words["adverbial"]),
                           n=rng.randint(2, 9))


def _sentence(rng, words, zh):
    subject, verb, obj = rng.choice(words["subject"]), rng.choice(words["verb"]), rng.choice(words["object"])
    adverbial, reason = rng.choice(words["adverbial"]), rng.choice(words["reason"])
    number = rng.randint(1, 2024)
    if zh:
        forms = [f"{subject}{adverbial}{verb}{obj}，{reason}。", f"{subject}{verb}{obj}。",
                 f"{adverbial}，{subject}一共{verb}{number}次{obj}！", f"关于{obj}，{subject}{verb}不少细节；{reason}。"]
    else:
        forms = [f"{subject} {verb} {obj} {adverbial}, {reason}.", f"{subject} {verb} {obj}.",
                 f"{adverbial.capitalize()}, {subject.lower()} {verb} {obj} {number} times!",
                 f"About {obj}: {subject.lower()} {verb} many details; {reason}."]
    return rng.choice(forms)


def _answer(rng, words, zh):
    count = rng.randint(1, 6)
    sentences = [_sentence(rng, words, zh) for _ in range(count)]
    if count > 2 and rng.random() < 0.3:  # a numbered list, one item per line
        return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))
    return ("" if zh else " ").join(sentences)


def synthetic_dialogues(count, seed):
    """``count`` dialogues of 1-5 turns, Chinese or English (a few mixed), about 30% of turns with an input.

    No text starts with a space (the fast and SentencePiece tokenizers differ only there)."""
    rng = random.Random(seed)
    dialogues = []
    for _ in range(count):
        zh = rng.random() < 0.55
        turns = []
        for _ in range(rng.randint(1, 5)):
            # one turn in ten asks in the other language
            words = ZH if (zh != (rng.random() < 0.1)) else EN
            turn_zh = words is ZH
            has_input = rng.random() < 0.3
            instruction = _fill(rng, words, rng.choice(words["question"]))
            input_text = "".join(_sentence(rng, words, turn_zh) for _ in range(rng.randint(1, 3))) if has_input else ""
            turns.append({"instruction": instruction, "input": input_text, "output": _answer(rng, words, turn_zh)})
        dialogues.append(turns)
    return dialogues


def write_jsonl(dialogues, path):
    with open(path, "w", encoding="utf-8") as f:
        for dialogue in dialogues:
            f.write(json.dumps(dialogue, ensure_ascii=False) + "\n")

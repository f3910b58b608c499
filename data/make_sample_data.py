"""Write the project's sample instruction-tuning data (Chinese and English dialogues).

Usage:
    python data/make_sample_data.py [--out_dir data/test]

Writes OUT_DIR/ift_data.pkl and OUT_DIR/ift_data.json, the same data in two forms, in the
original CuteGPT format: a list of dialogues; each dialogue is a list of turns; each turn is a
dict {'instruction': str, 'input': str, 'output': str}.  The pickle holds only lists, dicts and
str (pickle protocol 4); the JSON is UTF-8, indent=1, ensure_ascii=False, with a final newline.

The script is deterministic: the text is written by hand or built from small hand-written
tables (arithmetic problems are templated and their answers computed), and every random choice
comes from random.Random(SEED).  Running it twice gives byte-identical files.  Both files are
written to a temporary name in OUT_DIR and then renamed into place.

Dialogue 0 is always the canned two-turn book recommendation ('请推荐五本名著...' then
'再来三本呢？') used by the project's examples and tests.
"""
import argparse
import json
import os
import pickle
import random
import re
import sys
import tempfile

SEED = 20240521
PKL_NAME = "ift_data.pkl"
JSON_NAME = "ift_data.json"
MAX_OUTPUT_CHARS = 600
MAX_INSTRUCTION_CHARS = 200


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def T(instruction, output, input_=""):
    """One turn."""
    return {"instruction": instruction, "input": input_, "output": output}


def D(*turns):
    """One dialogue from tuples: (instruction, output) or (instruction, input, output)."""
    dialogue = []
    for t in turns:
        if len(t) == 2:
            dialogue.append(T(t[0], t[1]))
        elif len(t) == 3:
            dialogue.append(T(t[0], t[2], t[1]))
        else:
            raise ValueError(f"bad turn tuple: {t!r}")
    return dialogue


# ----------------------------------------------------------------------------------------------
# dialogue 0: the canned conversation
# ----------------------------------------------------------------------------------------------
def canned_dialogue():
    return D(
        ("请推荐五本名著，依次列出作品名、作者",
         "1.《红楼梦》——曹雪芹\n"
         "2.《呐喊》——鲁迅\n"
         "3.《百年孤独》——加西亚·马尔克斯\n"
         "4.《战争与和平》——列夫·托尔斯泰\n"
         "5.《傲慢与偏见》——简·奥斯汀"),
        ("再来三本呢？",
         "1.《骆驼祥子》——老舍\n"
         "2.《悲惨世界》——维克多·雨果\n"
         "3.《老人与海》——欧内斯特·海明威"),
    )


# ----------------------------------------------------------------------------------------------
# capitals (templated from small tables)
# ----------------------------------------------------------------------------------------------
# country, capital, capital in English, continent of the capital, country in English, note
ZH_CAPITALS = [
    ("中国", "北京", "Beijing", "亚洲", "China", ""),
    ("日本", "东京", "Tokyo", "亚洲", "Japan", ""),
    ("法国", "巴黎", "Paris", "欧洲", "France", "巴黎坐落在塞纳河畔。"),
    ("德国", "柏林", "Berlin", "欧洲", "Germany", ""),
    ("意大利", "罗马", "Rome", "欧洲", "Italy", ""),
    ("西班牙", "马德里", "Madrid", "欧洲", "Spain", ""),
    ("俄罗斯", "莫斯科", "Moscow", "欧洲", "Russia", ""),
    ("埃及", "开罗", "Cairo", "非洲", "Egypt", "开罗位于尼罗河畔。"),
    ("澳大利亚", "堪培拉", "Canberra", "大洋洲", "Australia", "很多人以为是悉尼，其实悉尼只是最大的城市。"),
    ("加拿大", "渥太华", "Ottawa", "北美洲", "Canada", "最大的城市多伦多并不是首都。"),
    ("巴西", "巴西利亚", "Brasília", "南美洲", "Brazil", "1960年以前首都是里约热内卢。"),
    ("印度", "新德里", "New Delhi", "亚洲", "India", ""),
    ("韩国", "首尔", "Seoul", "亚洲", "South Korea", ""),
    ("泰国", "曼谷", "Bangkok", "亚洲", "Thailand", ""),
    ("肯尼亚", "内罗毕", "Nairobi", "非洲", "Kenya", ""),
    ("希腊", "雅典", "Athens", "欧洲", "Greece", ""),
    ("土耳其", "安卡拉", "Ankara", "亚洲", "Turkey", "首都并不是很多人以为的伊斯坦布尔。"),
    ("阿根廷", "布宜诺斯艾利斯", "Buenos Aires", "南美洲", "Argentina", ""),
]

EN_CAPITALS = [
    ("Portugal", "Lisbon", "Europe", "里斯本", ""),
    ("Norway", "Oslo", "Europe", "奥斯陆", ""),
    ("Sweden", "Stockholm", "Europe", "斯德哥尔摩", "The city is spread over fourteen islands."),
    ("Poland", "Warsaw", "Europe", "华沙", ""),
    ("Austria", "Vienna", "Europe", "维也纳", "It is famous for its classical music history."),
    ("Ireland", "Dublin", "Europe", "都柏林", ""),
    ("Vietnam", "Hanoi", "Asia", "河内", "Ho Chi Minh City is the largest city."),
    ("Mongolia", "Ulaanbaatar", "Asia", "乌兰巴托", ""),
    ("Nigeria", "Abuja", "Africa", "阿布贾", "It replaced Lagos as the capital in 1991."),
    ("Ethiopia", "Addis Ababa", "Africa", "亚的斯亚贝巴", ""),
    ("Morocco", "Rabat", "Africa", "拉巴特", "Casablanca is the largest city."),
    ("Peru", "Lima", "South America", "利马", ""),
    ("New Zealand", "Wellington", "Oceania", "惠灵顿", "Auckland is the largest city."),
    ("Cuba", "Havana", "North America", "哈瓦那", "Cuba is an island nation in the Caribbean."),
]


def zh_capital_dialogues():
    answer_forms = [
        "{c}的首都是{cap}，这座城市位于{cont}。{note}",
        "{c}的首都是{cap}，位于{cont}。{note}",
        "是{cap}。{cap}是{c}的首都，也是全国的政治中心。{note}",
    ]
    dialogues = []
    for i, (c, cap, cap_en, cont, c_en, note) in enumerate(ZH_CAPITALS):
        first = answer_forms[i % len(answer_forms)].format(c=c, cap=cap, cont=cont, note=note).strip()
        turns = [
            (f"{c}的首都是哪里？", first),
            (f"{cap}用英文怎么写？", f"{cap}的英文写作 {cap_en}。"),
        ]
        if i % 3 == 0:
            turns.append((f"把“{c}的首都是{cap}”翻译成英文。", f"The capital of {c_en} is {cap_en}."))
        dialogues.append(D(*turns))
    return dialogues


def en_capital_dialogues():
    dialogues = []
    for i, (c, cap, cont, cap_zh, note) in enumerate(EN_CAPITALS):
        first = f"The capital of {c} is {cap}. {note}".strip()
        turns = [
            (f"What is the capital of {c}?", first),
            (f"Which continent is {cap} in?", f"{cap} is in {cont}."),
        ]
        if i % 3 == 1:
            turns.append((f"How do you write {cap} in Chinese?", f"In Chinese, {cap} is written {cap_zh}."))
        dialogues.append(D(*turns))
    return dialogues


# ----------------------------------------------------------------------------------------------
# arithmetic word problems (templated, answers computed)
# ----------------------------------------------------------------------------------------------
ZH_DIGITS = {7: "七", 8: "八", 9: "九"}


def _next_bill(total, bills):
    return next(b for b in bills if b > total)


def zh_arithmetic_dialogues(rng):
    dialogues = []

    # shopping, with change as a follow-up
    buyers = rng.sample([("小红", "她"), ("小明", "他"), ("王阿姨", "她"), ("李叔叔", "他"), ("小刚", "他")], 3)
    goods = rng.sample([("笔记本", "本", 3, 8), ("铅笔", "支", 1, 3), ("面包", "个", 4, 9),
                        ("练习册", "本", 5, 12), ("矿泉水", "瓶", 2, 4)], 3)
    for (name, pron), (item, unit, lo, hi) in zip(buyers, goods):
        n, p = rng.randint(3, 9), rng.randint(lo, hi)
        total = n * p
        pay = _next_bill(total, [10, 20, 50, 100])
        dialogues.append(D(
            (f"{name}买了{n}{unit}{item}，每{unit}{p}元，一共要付多少钱？",
             f"每{unit}{p}元，买了{n}{unit}，总价是 {p}×{n}={total}（元）。\n答：一共要付{total}元。"),
            (f"如果{name}付了{pay}元，应该找回多少钱？",
             f"应找回 {pay}-{total}={pay - total}（元）。\n答：{pron}应该拿回{pay - total}元。"),
        ))

    # speed, time and distance
    vehicles = [("一辆汽车", "汽车", [60, 80, 90]), ("一列火车", "火车", [120, 150, 200]),
                ("一艘轮船", "轮船", [30, 40])]
    for full, short, speeds in vehicles:
        v, t = rng.choice(speeds), rng.randint(2, 5)
        t2 = t + rng.randint(1, 3)
        dialogues.append(D(
            (f"{full}每小时行驶{v}千米，{t}小时能行驶多少千米？",
             f"路程=速度×时间，{v}×{t}={v * t}（千米）。\n答：能行驶{v * t}千米。"),
            (f"照这个速度，{short}行驶{v * t2}千米需要几小时？",
             f"时间=路程÷速度，{v * t2}÷{v}={t2}（小时）。\n答：需要{t2}小时。"),
        ))

    # rectangle area, then a changed width
    for _ in range(2):
        a, b = rng.randint(8, 20), rng.randint(3, 7)
        b2 = b + rng.randint(2, 4)
        dialogues.append(D(
            (f"一个长方形长{a}厘米，宽{b}厘米，它的面积是多少？",
             f"长方形面积=长×宽，{a}×{b}={a * b}（平方厘米）。\n答：面积是{a * b}平方厘米。"),
            (f"如果把这个长{a}厘米的长方形的宽增加到{b2}厘米，面积会增加多少？",
             f"新的面积是 {a}×{b2}={a * b2}（平方厘米），比原来增加了 {a * b2}-{a * b}={a * (b2 - b)}（平方厘米）。"),
        ))

    # division with remainder
    for child_word in ("颗糖", "支彩笔"):
        k = rng.randint(3, 8)
        n = k * rng.randint(3, 9) + rng.randint(1, k - 1)
        q, r = divmod(n, k)
        what = child_word[1:]
        dialogues.append(D(
            (f"{n}{child_word}平均分给{k}个小朋友，每人分到几{child_word[0]}？还剩几{child_word[0]}？",
             f"{n}÷{k}={q}……{r}。\n答：每人分到{q}{child_word[0]}{what}，还剩{r}{child_word[0]}。"),
        ))

    # ages
    for child in rng.sample(["小明", "小丽", "小军", "小芳"], 2):
        a, d, y = rng.randint(6, 12), rng.randint(24, 32), rng.randint(3, 10)
        f = a + d
        dialogues.append(D(
            (f"{child}今年{a}岁，爸爸比{child}大{d}岁，爸爸今年多少岁？",
             f"{a}+{d}={f}（岁）。\n答：爸爸今年{f}岁。"),
            (f"{y}年后，{child}和爸爸的年龄加起来是多少岁？",
             f"{y}年后{child}{a + y}岁，爸爸{f + y}岁，一共 {a + y}+{f + y}={a + f + 2 * y}（岁）。"),
        ))

    # discounts
    for item in ("外套", "书包"):
        p, z = rng.randint(8, 40) * 10, rng.choice([7, 8, 9])
        dialogues.append(D(
            (f"一件{item}原价{p}元，现在打{ZH_DIGITS[z]}折，现价多少元？" if item == "外套"
             else f"一个{item}原价{p}元，打{ZH_DIGITS[z]}折出售，现在卖多少元？",
             f"打{ZH_DIGITS[z]}折就是按原价的{z}0%出售：{p}×0.{z}={p * z // 10}（元）。\n答：现价{p * z // 10}元。"),
        ))

    # unit conversions (hand-picked numbers)
    dialogues += [
        D(("3.5千克等于多少克？", "1千克=1000克，所以3.5千克=3.5×1000=3500克。")),
        D(("2小时15分钟等于多少分钟？", "1小时=60分钟，2×60+15=135（分钟）。\n答：2小时15分钟等于135分钟。")),
        D(("5平方米等于多少平方厘米？", "1平方米=10000平方厘米，所以5平方米=5×10000=50000平方厘米。")),
        D(("1.2升等于多少毫升？", "1升=1000毫升，所以1.2升=1.2×1000=1200毫升。")),
        D(("一天一共有多少秒？", "一天有24小时，每小时60分钟，每分钟60秒：24×60×60=86400（秒）。")),
        D(("72千米每小时等于多少米每秒？", "72千米=72000米，1小时=3600秒，72000÷3600=20。\n答：72千米/小时等于20米/秒。")),
    ]
    return dialogues


def en_arithmetic_dialogues(rng):
    dialogues = []

    shoppers = rng.sample([("Emma", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he")], 2)
    goods = rng.sample([("notebooks", 2, 5), ("sandwiches", 4, 7), ("tickets", 6, 12)], 2)
    for (name, pron), (item, lo, hi) in zip(shoppers, goods):
        n, p = rng.randint(3, 8), rng.randint(lo, hi)
        total = n * p
        pay = _next_bill(total, [10, 20, 50, 100])
        dialogues.append(D(
            (f"{name} buys {n} {item} at ${p} each. How much does {pron} spend in total?",
             f"{n} × ${p} = ${total}. {name} spends ${total} in total."),
            (f"If {name} pays with a ${pay} bill, how much change should {pron} get?",
             f"${pay} - ${total} = ${pay - total}. {name} should get ${pay - total} in change."),
        ))

    for vehicle, speeds in (("train", [90, 120, 160]), ("cyclist", [15, 18, 20])):
        v, t = rng.choice(speeds), rng.randint(2, 4)
        t2 = t + rng.randint(1, 3)
        dialogues.append(D(
            (f"A {vehicle} travels at {v} km/h. How far does the {vehicle} go in {t} hours?",
             f"Distance = speed × time = {v} × {t} = {v * t} km."),
            (f"At that speed, how long would the {vehicle} take to cover {v * t2} km?",
             f"Time = distance ÷ speed = {v * t2} ÷ {v} = {t2} hours."),
        ))

    for place in ("garden", "playground"):
        a, b = rng.randint(10, 30), rng.randint(4, 9)
        dialogues.append(D(
            (f"A rectangular {place} is {a} m long and {b} m wide. What is its area?",
             f"Area = length × width = {a} × {b} = {a * b} square metres."),
            (f"How many metres of fencing would go all the way around that {a} m by {b} m {place}?",
             f"Perimeter = 2 × ({a} + {b}) = {2 * (a + b)} m, so {2 * (a + b)} metres of fencing are needed."),
        ))

    for group, unit in (("students", "teams"), ("eggs", "boxes")):
        k = rng.randint(4, 6) if group == "students" else 6
        n = k * rng.randint(3, 8) + rng.randint(1, k - 1)
        q, r = divmod(n, k)
        if group == "students":
            ins = f"{n} students are split into teams of {k}. How many full teams are there, and how many students are left over?"
            out = f"{n} ÷ {k} = {q} remainder {r}, so there are {q} full teams and {r} students left over."
        else:
            ins = f"A farmer packs {n} eggs into boxes of {k}. How many boxes are filled, and how many eggs are left?"
            out = f"{n} ÷ {k} = {q} remainder {r}, so {q} boxes are filled and {r} eggs are left."
        dialogues.append(D((ins, out)))

    s, s2, per = rng.randint(2, 4), rng.randint(6, 9), rng.randint(8, 16) * 5
    dialogues.append(D(
        (f"A pancake recipe uses {per * s} g of flour for {s} servings. How much flour is needed for {s2} servings?",
         f"Per serving: {per * s} ÷ {s} = {per} g. For {s2} servings: {per} × {s2} = {per * s2} g of flour."),
    ))
    s, s2, per = rng.randint(2, 4), rng.randint(5, 8), rng.randint(1, 2)
    dialogues.append(D(
        (f"A soup recipe uses {per * s} carrots for {s} servings. How many carrots are needed for {s2} servings?",
         f"Per serving: {per * s} ÷ {s} = {per} carrot{'s' if per > 1 else ''}. "
         f"For {s2} servings: {per} × {s2} = {per * s2} carrots."),
    ))

    for item in ("jacket", "pair of shoes"):
        p, pct = rng.randint(2, 8) * 20, rng.choice([10, 20, 25, 50])
        disc = p * pct // 100
        dialogues.append(D(
            (f"A {item} costs ${p} and is {pct}% off. What is the sale price?",
             f"The discount is {pct}% of ${p} = ${disc}. The sale price is ${p} - ${disc} = ${p - disc}."),
        ))

    dialogues += [
        D(("What is 15% of 80?", "15% of 80 = 0.15 × 80 = 12.")),
        D(("How many minutes are there in a week?", "7 days × 24 hours × 60 minutes = 10,080 minutes.")),
    ]
    return dialogues


# ----------------------------------------------------------------------------------------------
# tasks with an input: translation, classification, summarisation, rewriting, extraction
# ----------------------------------------------------------------------------------------------
def zh_translation_dialogues():
    return [
        D(("请把下面这句话翻译成英文。", "今天天气很好，我们去公园散步吧。",
           "The weather is lovely today, so let's go for a walk in the park."),
          ("把“散步”换成“骑自行车”，再翻译一次。",
           "The weather is lovely today, so let's go for a bike ride in the park.")),
        D(("Translate into English.", "请问地铁站怎么走？", "Excuse me, how do I get to the subway station?"),
          ("如果问的是公交车站呢？", "Excuse me, how do I get to the bus stop?")),
        D(("这句话用英语怎么说？", "我已经学了三年英语了。", "I have been learning English for three years.")),
        D(("帮我翻译成英文，语气正式一些。", "感谢您在百忙之中抽空参加本次会议。",
           "Thank you for taking time out of your busy schedule to attend this meeting.")),
        D(("翻成英文，口语化一点就行。", "这家店的面条太好吃了！", "The noodles at this place are so good!"),
          ("那“这家店的饺子也不错”呢？", "The dumplings here are pretty good too.")),
        D(("请给出下列句子的英文译文。", "图书馆周一闭馆。", "The library is closed on Mondays.")),
        D(("英文翻译：", "他每天早上六点起床跑步。", "He gets up at six every morning to go for a run.")),
        D(("Please translate this Chinese sentence into English.", "请不要在车厢内饮食。",
           "Please do not eat or drink in the carriage.")),
        D(("把这条通知译成英语。", "明天下午三点在二楼会议室开会，请准时参加。",
           "There will be a meeting in the second-floor meeting room at 3 p.m. tomorrow. Please be on time.")),
        D(("这句名言怎么翻译成英文比较好？", "三人行，必有我师。",
           "A common rendering is: \"When three people walk together, one of them can surely be my teacher.\" "
           "It means we can learn something from anyone.")),
        D(("将下面的中文翻译为英文。", "多喝水对身体有好处。", "Drinking plenty of water is good for your health.")),
        D(("请把这句话译成简洁的英文。", "由于下雨，比赛推迟到下周举行。",
           "Because of the rain, the match has been put off until next week."),
          ("改成新闻报道的语气呢？", "The match has been postponed until next week due to rain.")),
        D(("用英语表达这句话。", "我对花生过敏。", "I am allergic to peanuts."),
          ("再帮我翻译“我对海鲜也过敏”。", "I am also allergic to seafood.")),
        D(("翻译这句话，给出英文。", "这本书我看了两遍，每次都有新的收获。",
           "I have read this book twice, and each time I got something new out of it.")),
    ]


def en_translation_dialogues():
    return [
        D(("Translate into Chinese.", "Where is the nearest hospital?", "最近的医院在哪里？"),
          ("And how would I ask where the nearest pharmacy is?", "最近的药店在哪里？")),
        D(("Translate the following sentence into Chinese.", "I would like a cup of green tea, please.",
           "请给我一杯绿茶。"),
          ("What if I want it without sugar?", "请给我一杯不加糖的绿茶。")),
        D(("How would you say this in Chinese?", "It's been a long time since we last met.", "我们好久没见了。")),
        D(("Please give a Chinese translation of this sign.", "Wet floor. Please walk carefully.",
           "地面湿滑，请小心行走。")),
        D(("Translate this email line into polite Chinese.", "Please let me know if you have any questions.",
           "如有任何问题，请随时告诉我。")),
        D(("Render this sentence in Chinese.", "The museum opens at nine and closes at five.",
           "博物馆九点开门，五点关门。")),
        D(("Translate to Chinese, keeping it casual.", "No worries, I'll pick you up at the station.",
           "没事，我去车站接你。")),
        D(("What is this in Chinese?", "Happy birthday! I hope all your wishes come true.", "生日快乐！祝你心想事成。"),
          ("Make the Chinese version sound more formal.", "祝您生日快乐，万事如意！")),
        D(("Can you translate this into Chinese for me?", "The train to Shanghai is delayed by twenty minutes.",
           "开往上海的列车晚点二十分钟。")),
        D(("Translate this proverb into Chinese and explain it briefly.", "Practice makes perfect.",
           "熟能生巧。意思是反复练习，就能把事情做得又快又好。")),
        D(("Chinese translation, please.", "My phone battery is almost dead.", "我的手机快没电了。"),
          ("How do I say that I need to charge it?", "我需要给手机充电。")),
        D(("Give the Chinese for this sentence.", "Could you speak a little more slowly?", "您能说得慢一点吗？")),
    ]


def zh_classification_dialogues():
    return [
        D(("判断下面这条评论的情感倾向（正面/负面）。", "快递很快，包装也很仔细，下次还来买。",
           "正面。评论称赞了发货速度和包装，并表示愿意再次购买。")),
        D(("这句话表达的是正面还是负面情绪？", "等了一个小时菜还没上，服务员态度也很差。",
           "负面。说话人抱怨上菜太慢，并且对服务态度不满。")),
        D(("请对以下用户反馈做情感分类：正面、负面或中性。", "这款耳机音质一般，不过价格还算合理。",
           "中性。评价中既有不足（音质一般），也有肯定（价格合理），整体态度比较平衡。"),
          ("哪些词让你觉得它是中性的？",
           "“一般”表示不太满意，“还算合理”表示有所肯定，两者相互抵消，所以整体偏中性。")),
        D(("分析这条电影短评的情感。", "剧情拖沓，看到一半就睡着了。",
           "负面。“剧情拖沓”“睡着了”都说明观众觉得这部电影很无聊。")),
        D(("判断这句话的情感极性。", "孩子第一次自己系好了鞋带，我高兴了一整天。",
           "正面。说话人因为孩子的进步感到非常开心。")),
        D(("下面这条酒店评价是好评还是差评？", "房间干净宽敞，窗外就能看到海，早餐种类也多。",
           "好评。评价肯定了房间、景观和早餐，语气很满意。"),
          ("帮我以酒店的名义写一句简短的回复。",
           "感谢您的入住与好评！很高兴您喜欢我们的海景房和早餐，期待您再次光临。")),
        D(("给这条微博的情绪打个标签。", "又加班到十点，地铁也停了，真是够了。",
           "负面（疲惫、烦躁）。说话人对加班和交通不便感到不满。")),
        D(("这条商品评论的态度是什么？", "和图片一样，尺码标准，穿着舒服。",
           "正面。买家认为商品与描述相符，穿着体验也好。")),
        D(("判断以下句子是积极、消极还是中性。", "会议改到周四下午两点举行。",
           "中性。这句话只是客观地通知时间变更，没有表达情绪。")),
        D(("说说这句评价的情感倾向。", "手机用了三天就黑屏，客服一直推脱。",
           "负面。说话人遇到了质量问题，而且对售后处理不满意。"),
          ("如果你是客服，应该怎么回复这位用户？",
           "非常抱歉给您带来不便！请提供订单号，我们会优先为您安排检测，确认是质量问题后为您免费换新。")),
        D(("这句话属于哪一类新闻：体育、科技还是娱乐？", "国产大型客机完成了又一次长途试飞。",
           "科技。这条新闻讲的是客机试飞，属于航空科技领域。")),
        D(("判断这个问题属于哪门学科。", "为什么铁放在潮湿的地方容易生锈？",
           "化学。铁生锈是铁与氧气、水发生化学反应的结果。")),
    ]


def en_classification_dialogues():
    return [
        D(("Classify the sentiment of this review as positive or negative.",
           "The battery lasts all day and the screen is gorgeous.",
           "Positive. The reviewer praises both the battery life and the screen.")),
        D(("Is the following tweet positive, negative, or neutral?",
           "My flight got cancelled again. Third time this month.",
           "Negative. The writer is frustrated about repeated flight cancellations.")),
        D(("What is the sentiment of this sentence?", "The package arrived on Tuesday.",
           "Neutral. It simply states a fact without expressing any feeling.")),
        D(("Label the emotion in this message.", "I passed my driving test on the first try!",
           "Positive (joy and pride). The writer is happy about passing the test.")),
        D(("Decide whether this restaurant review is favourable.",
           "The soup was cold and the waiter forgot our order twice.",
           "Not favourable. The review complains about cold food and poor service.")),
        D(("Sentiment analysis: positive, negative or mixed?", "Great location, but the room was tiny and noisy.",
           "Mixed. The location is praised, while the size of the room and the noise are criticised."),
          ("Which part of the review is negative?",
           "\"The room was tiny and noisy\" is the negative part; \"great location\" is the positive part.")),
        D(("Tell me if this customer comment is happy or unhappy.", "Support fixed my problem in five minutes. Impressive!",
           "Happy. The customer is impressed by how quickly support solved the problem.")),
        D(("Classify this movie comment by sentiment.", "I checked my watch every ten minutes.",
           "Negative. Checking the time often suggests the viewer found the movie boring."),
          ("Why is that negative if it never says the movie was bad?",
           "It is implied: people keep checking the time when they are bored and want something to end.")),
        D(("Is this email spam or not spam?", "Congratulations! You have won a free cruise. Click here to claim your prize now!",
           "Spam. It promises an unexpected prize and pushes you to click a link, which are typical signs of spam.")),
        D(("Which category does this headline belong to: sports, politics, or science?",
           "Astronomers spot a new comet heading toward the inner solar system.",
           "Science. The headline is about an astronomical discovery.")),
    ]


def zh_summary_dialogues():
    return [
        D(("用一句话总结下面这段话。",
           "近年来，越来越多的城市开始建设共享单车停放点。这些停放点通常设在地铁站和公交站附近，方便市民换乘。"
           "管理部门表示，规范停放不仅让街道更整洁，也减少了车辆乱停带来的安全隐患。",
           "城市在交通站点附近设置共享单车停放点，方便换乘，也让街道更整洁、更安全。")),
        D(("总结下面这段话的主要内容。",
           "小王原本每天晚上都刷手机到凌晨。后来他给自己定了规矩：十一点后把手机放在客厅充电，卧室里只留一本书。"
           "一个月后，他发现自己入睡更快了，白天工作也更有精神。",
           "小王坚持睡前不把手机带进卧室，一个月后入睡更快，白天也更有精神。"),
          ("再给这段话起个标题。", "可以叫《把手机留在卧室门外》。")),
        D(("请概括这段文字。",
           "蜜蜂在采蜜的过程中会把花粉从一朵花带到另一朵花上，帮助植物完成授粉。许多水果和蔬菜都依赖这种授粉方式。"
           "如果蜜蜂数量大幅减少，农作物的产量也可能随之下降。",
           "蜜蜂采蜜时帮助植物授粉，许多农作物依赖它们，蜜蜂减少可能导致农作物减产。"),
          ("那我们能为保护蜜蜂做些什么？",
           "可以在阳台或院子里种些开花植物，少用或不用杀虫剂，也可以购买本地养蜂人的蜂蜜来支持他们。")),
        D(("帮我把这段话压缩成不超过三十个字。",
           "本次社区读书会将于本周六上午十点在社区图书室举行，主题是“我最喜欢的一本童书”。"
           "欢迎家长带孩子一起参加，现场还会准备小礼品。",
           "周六上午十点社区图书室办亲子读书会，有小礼品。")),
        D(("提炼这段话的要点，分条列出。",
           "这家公司今年推出了三项新政策：员工每周可以远程办公一天；每年增加两天带薪假；新员工入职时会安排一位老同事做导师。",
           "1. 每周可远程办公一天；\n2. 每年增加两天带薪假；\n3. 新员工配备一位导师。")),
        D(("这段话讲了什么？简要说明。",
           "古时候，人们用日晷测量时间。日晷利用太阳照射下指针影子的位置来表示时刻。"
           "不过到了阴天或夜晚，日晷就无法使用，因此人们又发明了漏刻等计时工具。",
           "这段话介绍了日晷靠太阳的影子计时，但阴天和夜晚无法使用，于是人们又发明了漏刻等工具。")),
    ]


def en_summary_dialogues():
    return [
        D(("Summarise this paragraph in one sentence.",
           "The town library has started lending more than books. Residents can now borrow tools such as drills and "
           "ladders, as well as board games and even sewing machines. Librarians say the program helps people save "
           "money and reduces waste.",
           "The town library now lends tools, games and other items to help residents save money and reduce waste.")),
        D(("Give me a short summary of the text below.",
           "Maria wanted to learn the guitar but never had time. She decided to practise for just ten minutes every "
           "morning before work. After six months, she could play a dozen songs and had performed at a friend's party.",
           "By practising ten minutes every morning, Maria learned a dozen songs on the guitar in six months."),
          ("Now give it a title.", "\"Ten Minutes a Day\"")),
        D(("What is the main point of this passage?",
           "Many people think deserts are always hot, but that is not true. Deserts are defined by how little rain "
           "they receive, not by temperature. Antarctica, for example, is the largest desert on Earth, and it is "
           "extremely cold.",
           "Deserts are defined by low rainfall rather than heat, so even icy Antarctica counts as a desert.")),
        D(("Summarise these meeting notes in two bullet points.",
           "We agreed to move the product launch from May to June because testing is behind schedule. Sam will update "
           "the website text by Friday, and Lee will contact the printer about the new dates.",
           "- The launch moves from May to June because testing is behind.\n"
           "- Sam updates the website by Friday; Lee contacts the printer.")),
        D(("TL;DR this, please.",
           "Our neighbourhood cleanup on Saturday collected forty bags of rubbish from the riverbank. Thirty "
           "volunteers joined, including several families with children. The council has offered to provide gloves "
           "and bags for the next event in autumn.",
           "Thirty volunteers collected forty bags of rubbish; the council will supply gear for the autumn cleanup.")),
    ]


def zh_rewrite_dialogues():
    return [
        D(("把这句话改写得更正式一些。", "明天的会别迟到啊。", "请各位准时参加明天的会议。"),
          ("再改得亲切一点，但不要太随意。", "明天的会议请大家准时到场，谢谢配合！")),
        D(("请用更委婉的语气改写下面这句话。", "你的方案不行，重新做。",
           "这个方案还有一些可以改进的地方，能否再调整一下？")),
        D(("把下面的句子改成被动句。", "小猫打翻了花瓶。", "花瓶被小猫打翻了。")),
        D(("把这句话写得生动一点。", "今天很热。", "今天的太阳像个大火炉，连柏油路都被晒得发软了。"),
          ("再写一句描写冬天很冷的。", "北风像刀子一样刮在脸上，呼出的气一出口就变成了白雾。")),
        D(("把这句话扩写成两三句话。", "我喜欢下雨天。",
           "我喜欢下雨天。雨点敲打窗户的声音让人很安心，泡一杯热茶、读一本书，时间好像都变慢了。")),
        D(("用更简洁的方式改写这句话。", "在这个时候此刻，我们大家都应该要认真仔细地考虑一下这个问题。",
           "此刻，我们都应认真考虑这个问题。")),
        D(("修改下面的病句。", "通过这次活动，使我明白了团结的重要性。",
           "修改后：通过这次活动，我明白了团结的重要性。（原句缺少主语，删去“使”即可。）")),
        D(("这句话有错别字，请改正。", "他做事一向很认真，从不马乎。", "应为“马虎”：他做事一向很认真，从不马虎。")),
        D(("请指出并改正句子中的语病。", "我们要尽可能避免不再犯同样的错误。",
           "“避免”和“不再”连用，意思反了。应改为：我们要尽可能避免再犯同样的错误。")),
        D(("检查一下这句话的标点是否正确。", "你今天去学校了吗。", "问句末尾应该用问号：你今天去学校了吗？")),
    ]


def en_rewrite_dialogues():
    return [
        D(("Fix the grammar in this sentence.", "She don't like apples.", "She doesn't like apples.")),
        D(("Correct any mistakes in the following sentence.", "Me and him goes to the same school.",
           "He and I go to the same school."),
          ("Why is \"Me and him\" wrong?",
           "They are the subject of the sentence, so they need subject pronouns: \"he\" and \"I\". "
           "It is also polite to put yourself last.")),
        D(("Proofread this line.", "Their going to the beach tomorrow.", "They're going to the beach tomorrow.")),
        D(("Please correct the verb tense.", "Yesterday I go to the market and buy some fish.",
           "Yesterday I went to the market and bought some fish."),
          ("Now rewrite it in the future tense.", "Tomorrow I will go to the market and buy some fish.")),
        D(("Can you fix the spelling?", "I recieved your mesage this morning.", "I received your message this morning.")),
        D(("Improve the grammar of this sentence.", "There is many reasons to learn a second language.",
           "There are many reasons to learn a second language.")),
        D(("Fix the punctuation.", "its a nice day lets go outside", "It's a nice day. Let's go outside!")),
        D(("Make this sentence grammatically correct.", "He have been working here since three years.",
           "He has been working here for three years.")),
        D(("Rewrite this sentence to sound more formal.", "Hey, can you send me the report ASAP?",
           "Could you please send me the report at your earliest convenience?"),
          ("Now make it friendly but still polite.", "Hi! Could you send me the report as soon as you can? Thanks so much!")),
        D(("Make this sentence more concise.",
           "At this point in time, we are currently in the process of reviewing the applications.",
           "We are reviewing the applications.")),
        D(("Rewrite this in the passive voice.", "The chef prepared a special dessert.",
           "A special dessert was prepared by the chef.")),
        D(("Make this product description sound more exciting.", "This backpack has two pockets and is waterproof.",
           "Rain or shine, this waterproof backpack keeps your gear dry, with two handy pockets for everything you need!")),
    ]


def zh_extraction_dialogues():
    return [
        D(("提取下面这段话的关键词。", "新能源汽车的续航里程不断提升，充电桩的数量也在快速增加。",
           "关键词：新能源汽车、续航里程、充电桩")),
        D(("从下面的句子中找出三个关键词。", "春天的西湖，柳树发芽，游客们在湖边拍照赏花。", "西湖、柳树、赏花")),
        D(("请列出这段话里出现的地名。", "他先从成都出发，途经重庆，最后到达武汉。", "成都、重庆、武汉"),
          ("这三个城市分别属于哪个省级行政区？", "成都属于四川省，重庆本身是直辖市，武汉属于湖北省。")),
        D(("抽取这条招聘信息的关键信息。", "招聘前端工程师一名，要求熟悉JavaScript，有两年以上工作经验，工作地点在杭州。",
           "职位：前端工程师\n人数：一名\n技能：熟悉JavaScript\n经验：两年以上\n地点：杭州")),
        D(("找出这句话中的人名和时间。", "李华和张伟约好周日上午九点在图书馆见面。", "人名：李华、张伟\n时间：周日上午九点")),
    ]


def en_extraction_dialogues():
    return [
        D(("Extract the keywords from this sentence.",
           "Solar panels convert sunlight into electricity for homes and businesses.",
           "Keywords: solar panels, sunlight, electricity")),
        D(("List the names of people mentioned in the text.",
           "After the concert, Anna and Ravi drove home while Tom stayed to help pack up.", "Anna, Ravi and Tom.")),
        D(("Pull out all the dates in this message.",
           "The course starts on 3 March, the midterm is on 14 April, and the final exam is on 2 June.",
           "3 March, 14 April and 2 June."),
          ("How many weeks are there between the start and the midterm?",
           "From 3 March to 14 April is 42 days, which is exactly 6 weeks.")),
        D(("Which programming languages are mentioned here?",
           "The team rewrote the backend from PHP to Go, but kept the data scripts in Python.",
           "Three languages: PHP, Go and Python.")),
    ]


# ----------------------------------------------------------------------------------------------
# knowledge, writing, code, advice, lists (hand-written)
# ----------------------------------------------------------------------------------------------
def zh_knowledge_dialogues():
    return [
        # science
        D(("水的沸点是多少摄氏度？", "在标准大气压下，水的沸点是100摄氏度。海拔越高，气压越低，沸点也会随之降低。"),
          ("那在高山上煮饭为什么不容易熟？",
           "高山上气压低，水不到100摄氏度就沸腾了，锅里温度不够高，所以饭菜不容易煮熟。人们常用高压锅来解决这个问题。")),
        D(("为什么天空是蓝色的？",
           "阳光进入大气层后会被空气分子散射，波长较短的蓝光被散射得更强，从各个方向进入我们的眼睛，所以天空看起来是蓝色的。"),
          ("那傍晚的天空为什么会发红？",
           "傍晚阳光斜射，要穿过更厚的大气层，蓝光在途中大多被散射掉了，剩下波长较长的红光和橙光，所以天空呈现红色。")),
        D(("植物的光合作用需要哪些条件？", "光合作用需要光照、二氧化碳和水，在叶绿体中进行，产物是有机物（如葡萄糖）和氧气。")),
        D(("地球绕太阳转一圈大约需要多长时间？",
           "大约365.25天，也就是一年。多出来的约四分之一天每四年累积成一天，所以有了闰年。"),
          ("那地球自转一圈呢？", "地球自转一圈大约需要24小时（严格地说约23小时56分），自转形成了昼夜交替。")),
        D(("人体最大的器官是什么？", "人体最大的器官是皮肤。它能保护身体、调节体温，还能感受冷热和触碰。")),
        D(("月亮为什么会有阴晴圆缺？",
           "月亮本身不发光，而是反射太阳光。月球绕地球运行时，我们看到它被照亮部分的大小不断变化，于是出现新月、上弦月、满月、下弦月等月相。")),
        D(("声音在空气中传播得快，还是在水中快？", "在水中更快。声音在常温空气中每秒约传播340米，在水中每秒约传播1500米。")),
        D(("彩虹是怎么形成的？",
           "雨后空气中有许多小水滴，阳光射入水滴时发生折射和反射，不同颜色的光偏折程度不同，就被分开形成了彩虹。彩虹总是出现在背对太阳的方向。")),
        D(("太阳系有几颗行星？", "太阳系有八颗行星，按离太阳由近到远依次是：水星、金星、地球、火星、木星、土星、天王星、海王星。"),
          ("其中最大的是哪一颗？", "最大的是木星，它的体积大约是地球的1300多倍。"),
          ("离太阳最近的那颗呢？", "离太阳最近的是水星，它也是八大行星中最小的一颗。")),
        D(("为什么冬天摸铁栏杆比摸木头凉？",
           "铁的导热性比木头好得多。手碰到铁时，热量被迅速带走，所以感觉更凉，其实两者的温度差不多。")),
        D(("水由哪些元素组成？", "水由氢和氧两种元素组成，化学式是H₂O，每个水分子含有两个氢原子和一个氧原子。")),
        D(("什么是食物链？请举个例子。", "食物链是生物之间“吃与被吃”的关系链。例如：草→兔子→狐狸，草被兔子吃，兔子又被狐狸吃。")),
        D(("为什么要勤洗手？", "手上容易沾染细菌和病毒。用肥皂和流动的水洗手至少20秒，可以有效减少病菌传播，预防感冒、腹泻等疾病。")),
        D(("光在真空中的速度是多少？", "光在真空中的速度约为每秒30万千米，精确值是每秒299792458米。")),
        D(("鲸鱼是鱼吗？", "不是。鲸鱼是哺乳动物，用肺呼吸，胎生并用乳汁哺育幼崽，只是生活在水中、外形像鱼。"),
          ("还有哪些动物名字里有“鱼”但其实不是鱼？",
           "比如鳄鱼（爬行动物）、娃娃鱼（大鲵，属于两栖动物）、鱿鱼和章鱼（软体动物）。")),
        D(("为什么会有四季变化？",
           "因为地球的自转轴是倾斜的（约23.5度）。地球绕太阳公转时，太阳直射点在南北回归线之间移动，各地接受的阳光多少随之变化，于是形成了四季。")),
        # geography and history
        D(("世界上最高的山峰是哪座？", "珠穆朗玛峰，海拔约8848.86米，位于中国和尼泊尔边境的喜马拉雅山脉。"),
          ("它是哪一年首次有人登顶的？", "1953年，新西兰人埃德蒙·希拉里和尼泊尔夏尔巴人丹增·诺尔盖首次登上了珠峰峰顶。")),
        D(("中国最长的河流是哪条？", "长江，全长约6300千米，是中国第一长河，也是亚洲第一长河。"),
          ("第二长的呢？", "第二长的是黄河，全长约5464千米，被称为中华民族的“母亲河”。")),
        D(("秦始皇做了哪些重要的事？",
           "秦始皇于公元前221年统一六国，建立秦朝；他统一了文字、货币和度量衡，推行郡县制，还修筑了长城和驰道。")),
        D(("中国古代的四大发明指的是什么？", "中国古代四大发明是造纸术、印刷术、火药和指南针。"),
          ("其中造纸术是谁改进的？", "东汉的蔡伦改进了造纸术，他用树皮、麻头、破布和旧渔网等原料造纸，降低了成本。")),
        D(("世界上面积最大的海洋是哪个？", "太平洋，面积约1.65亿平方千米，将近世界海洋总面积的一半。")),
        D(("丝绸之路是什么？",
           "丝绸之路是古代连接中国与中亚、西亚和欧洲的贸易通道，西汉张骞出使西域后逐渐兴盛。丝绸、茶叶、香料等商品和各种文化沿着它交流传播。")),
        D(("中国有多少个省级行政区？", "中国共有34个省级行政区，包括23个省、5个自治区、4个直辖市和2个特别行政区。")),
        D(("长城最早是在什么时候修建的？",
           "早在春秋战国时期，各诸侯国就开始修筑长城。秦朝统一后把各段连接起来，我们今天看到的大部分城墙是明朝修建的。")),
        D(("世界上面积最大的国家是哪个？", "俄罗斯，国土面积约1710万平方千米，横跨欧洲和亚洲。"),
          ("第二大呢？", "第二大的是加拿大，面积约998万平方千米。")),
        D(("唐朝的都城在哪里？", "唐朝的都城是长安，就是今天的陕西省西安市。当时的长安是世界上规模最大的城市之一。")),
        D(("世界上最大的沙漠是哪个？", "如果按“降水极少”的定义，最大的是南极洲；如果只算炎热的沙漠，最大的是非洲的撒哈拉沙漠。")),
        D(("郑和下西洋是在哪个朝代？", "明朝。从1405年到1433年，郑和先后七次率领船队远航，最远到达非洲东海岸。")),
        D(("中国的国宝动物是什么？", "大熊猫。它们主要生活在四川、陕西和甘肃的山区，以竹子为主要食物。")),
        # culture and daily knowledge
        D(("“床前明月光”的下一句是什么？", "下一句是“疑是地上霜”，出自唐代诗人李白的《静夜思》。"),
          ("把整首诗背一下。", "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。")),
        D(("“春眠不觉晓”出自哪首诗？", "出自唐代诗人孟浩然的《春晓》，下一句是“处处闻啼鸟”。")),
        D(("中秋节有哪些习俗？", "中秋节在农历八月十五，主要习俗有赏月、吃月饼、家人团聚，有些地方还会提灯笼、猜灯谜。")),
        D(("端午节为什么要吃粽子？",
           "相传是为了纪念战国时期楚国诗人屈原。人们把粽子投入江中，希望鱼虾不要伤害他的身体，后来吃粽子、赛龙舟就成了端午习俗。")),
        D(("春节是农历的哪一天？", "春节是农历正月初一，是中国最重要的传统节日，人们会贴春联、吃年夜饭、拜年、发红包。")),
        D(("一年中哪几个月有31天？", "1月、3月、5月、7月、8月、10月和12月，一共7个月有31天。"),
          ("那二月呢？", "平年的二月有28天，闰年的二月有29天。")),
        D(("成语“亡羊补牢”是什么意思？", "羊丢了以后赶紧修补羊圈，比喻出了问题后及时补救，还不算晚。")),
        D(("“画龙点睛”一般用在什么场合？", "形容在关键处加上精彩的一笔，使整体更加生动传神。例如：文章结尾这一句真是画龙点睛。")),
        D(("感冒了应该怎么办？",
           "多休息、多喝温水，饮食清淡。如果高烧不退或症状加重，应及时就医。普通感冒多由病毒引起，不要自行滥用抗生素。")),
        D(("早餐吃什么比较健康？", "可以把主食、蛋白质和蔬果搭配起来，例如燕麦或全麦面包、一个鸡蛋、一杯牛奶，再加一份水果。")),
        D(("怎么写一张请假条？",
           "请假条一般包括称呼、请假原因、请假时间、署名和日期。例如：\n王老师：\n我因发烧需要去医院，特请假一天（5月10日），望批准。\n学生：李明\n5月9日")),
        D(("如何泡一杯好喝的绿茶？", "用80℃左右的水，不要用刚烧开的沸水；茶叶不要放太多；泡两三分钟即可，泡太久会发苦。")),
        D(("番茄炒蛋怎么做？",
           "1. 鸡蛋打散，番茄切块；\n2. 热油炒鸡蛋，凝固后盛出；\n3. 再放少许油炒番茄，炒出汁；\n4. 倒入鸡蛋，加盐翻炒均匀即可。"),
          ("需要放糖吗？", "可以放一小勺糖，能中和番茄的酸味，让味道更柔和；喜欢酸一点的也可以不放。"),
          ("一个人吃的话用几个鸡蛋合适？", "一个人吃，用两个鸡蛋配一个中等大小的番茄就够了。"),
          ("把做法概括成三步。", "1. 炒鸡蛋盛出；\n2. 炒番茄出汁；\n3. 合在一起加盐翻炒。")),
    ]


def en_knowledge_dialogues():
    return [
        D(("Why do we have day and night?",
           "Because the Earth spins on its axis about once every 24 hours. The side facing the Sun has day, and the "
           "side facing away has night.")),
        D(("What gas do plants absorb from the air?",
           "Plants absorb carbon dioxide. During photosynthesis they use it, together with water and sunlight, to "
           "make sugar, and they release oxygen.")),
        D(("What is the boiling point of water in Fahrenheit?", "At sea level, water boils at 212 °F, which is 100 °C."),
          ("And the freezing point?", "Water freezes at 32 °F, which is 0 °C.")),
        D(("How many bones are in the adult human body?",
           "An adult human has 206 bones. Babies are born with more, but some of them fuse together as they grow.")),
        D(("What is the largest planet in our solar system?",
           "Jupiter. It is a gas giant and is about 11 times wider than Earth."),
          ("Does it have moons?",
           "Yes, dozens of them. The four largest, Io, Europa, Ganymede and Callisto, were discovered by Galileo in 1610.")),
        D(("Why does ice float on water?",
           "Ice is less dense than liquid water. When water freezes, its molecules form an open crystal structure "
           "that takes up more space, so the ice floats.")),
        D(("What causes tides in the ocean?",
           "Mainly the Moon's gravity, which pulls on the oceans; the Sun has a smaller effect. Most coasts have two "
           "high tides and two low tides a day.")),
        D(("What is the chemical symbol for gold?", "The chemical symbol for gold is Au, from the Latin word aurum."),
          ("What about silver?", "Silver is Ag, from the Latin word argentum.")),
        D(("How long does sunlight take to reach Earth?",
           "About 8 minutes and 20 seconds, because the Sun is roughly 150 million kilometres away.")),
        D(("What is the difference between weather and climate?",
           "Weather is the short-term state of the atmosphere, like today's rain. Climate is the average pattern of "
           "weather in a place over many years.")),
        D(("Why do leaves change colour in autumn?",
           "As the days get shorter, trees stop making green chlorophyll. As it breaks down, yellow and orange "
           "pigments that were there all along show through, and some trees also make red pigments.")),
        D(("What are the three states of matter we see every day?",
           "Solid, liquid and gas. Water shows all three: ice, liquid water and steam.")),
        D(("What is the longest river in Africa?", "The Nile, about 6,650 km long. It flows north into the Mediterranean Sea."),
          ("What is the longest river in South America?",
           "The Amazon. It also carries more water than any other river in the world.")),
        D(("Who was the first person to walk on the Moon?",
           "Neil Armstrong, in July 1969, during NASA's Apollo 11 mission."),
          ("Who went with him?",
           "Buzz Aldrin also walked on the Moon, while Michael Collins stayed in orbit in the command module.")),
        D(("When did World War II end?",
           "In 1945: the war in Europe ended in May, and in Asia it ended when Japan formally surrendered in September.")),
        D(("Which is the smallest continent?", "Australia is the smallest continent by land area.")),
        D(("What ocean lies between Europe and North America?",
           "The Atlantic Ocean. It is the second-largest ocean after the Pacific.")),
        D(("Who is credited with inventing the telephone?",
           "Alexander Graham Bell received the first US patent for the telephone in 1876, although other inventors "
           "were working on similar ideas at the time.")),
        D(("What is the tallest mountain in Africa?", "Mount Kilimanjaro in Tanzania, about 5,895 metres high.")),
        D(("I'm visiting Paris for two days. What should I see?",
           "Day 1: the Eiffel Tower, a walk along the Seine and Notre-Dame Cathedral.\n"
           "Day 2: the Louvre in the morning, then Montmartre and the Sacré-Cœur."),
          ("Which of those is best for kids?",
           "The Eiffel Tower is usually the favourite: the lifts and the view are exciting for children."),
          ("How do I get between them?",
           "The Paris Métro is the easiest way; most sights are near a station. Walking along the river is also pleasant."),
          ("Is the Louvre open every day?", "No. The Louvre is closed on Tuesdays, so plan your visit for another day."),
          ("Thanks! Summarise the plan in one line.",
           "Day 1: Eiffel Tower and the Seine; Day 2: the Louvre (not on a Tuesday) and Montmartre, by Métro.")),
    ]


def zh_creative_dialogues():
    return [
        D(("写一首关于春天的四行小诗。", "春风轻轻过山冈，\n柳枝新绿映池塘。\n燕子衔泥归旧檐，\n一路花香到学堂。"),
          ("再写一首关于秋天的。", "秋风吹黄一片林，\n稻田金浪接天云。\n大雁排队向南去，\n月光如水照乡村。"),
          ("给这两首诗各起个题目。", "第一首可以叫《春归》，第二首可以叫《秋望》。")),
        D(("以“月亮”为题写一首儿童诗。", "月亮是一只小船，\n在夜空里慢慢地摇，\n载着星星去旅行，\n天亮了，才回家睡觉。")),
        D(("写两句鼓励考生的话，要押韵。", "十年寒窗磨一剑，\n今朝提笔写新篇。")),
        D(("用三行写一首关于雨的小诗。", "雨点敲着窗，\n一遍一遍地问：\n屋里的人，要不要出来走走？")),
        D(("写一首五言绝句，描写大海。", "碧浪连天去，\n白鸥逐日飞。\n潮声千万里，\n夜半送船归。"),
          ("解释一下最后一句的意思。", "“夜半送船归”是说到了深夜，潮水声仿佛在护送出海的船只平安回家，表达了对出海人归来的期盼。")),
        D(("给妈妈写一段生日祝福，像诗一样。",
           "您把岁月织成温暖的毛衣，\n把牵挂煮成每天的早餐。\n今天换我对您说：\n妈妈，生日快乐，愿您永远平安。")),
        D(("帮我给新开的奶茶店想三个店名。", "1. 茶语时光\n2. 一杯晴天\n3. 慢半拍"),
          ("第二个名字有什么寓意？", "“一杯晴天”寓意喝一杯奶茶就能让心情变得晴朗，听起来轻松温暖，适合年轻顾客。")),
        D(("写一句关于珍惜时间的标语。", "一寸光阴一寸金，今天的努力是明天的底气。")),
    ]


def en_creative_dialogues():
    return [
        D(("Write a short poem about the sea.",
           "Grey waves roll in and slip away,\nthey carry shells and salt and spray;\n"
           "the sea keeps time without a clock,\nand writes its name on every rock."),
          ("Now write one about the mountains.",
           "The mountains wait in quiet white,\nthey hold the snow and catch the light;\n"
           "the clouds climb up to rest a while,\nthen drift away in single file."),
          ("Give each poem a title.", "The first could be \"Tide Song\" and the second \"Quiet Peaks\".")),
        D(("Write a haiku about morning coffee.", "Steam curls from the cup,\nthe kitchen still half asleep,\nfirst sip, the day wakes.")),
        D(("Write a four-line birthday poem for a friend.",
           "Another year has come your way,\nwith cake and friends and games to play;\n"
           "may every wish you make come true,\nhappy birthday, this one's for you!")),
        D(("Write a limerick about a cat who loves boxes.",
           "There once was a cat named Lou\nwho found a big box, shiny and new.\nShe leapt in with glee,\n"
           "as snug as could be,\nand ignored the soft bed we'd bought too.")),
        D(("Write a short poem to cheer up someone who failed an exam.",
           "One test is just a single day,\nnot who you are or where you'll stay;\n"
           "so rest, then rise, and try once more—\nthe next door's nearer than before.")),
        D(("Suggest three names for a bakery.", "1. Rise & Shine\n2. The Golden Crust\n3. Flour Power"),
          ("Which one would suit a small family shop?",
           "\"The Golden Crust\" sounds warm and traditional, which fits a small family bakery well.")),
    ]


def zh_code_dialogues():
    return [
        D(("用Python写一个函数，判断一个整数是不是偶数。",
           "```python\ndef is_even(n):\n    return n % 2 == 0\n```\n例如 is_even(4) 返回 True，is_even(7) 返回 False。"),
          ("能改成判断奇数吗？", "```python\ndef is_odd(n):\n    return n % 2 != 0\n```\n例如 is_odd(7) 返回 True。")),
        D(("Python中列表和元组有什么区别？",
           "列表（list）用方括号表示，创建后可以修改；元组（tuple）用圆括号表示，创建后不能修改。元组可以作为字典的键，列表不行。")),
        D(("用Python计算1到100的和。", "```python\ntotal = sum(range(1, 101))\nprint(total)  # 5050\n```")),
        D(("写一个Python函数，把字符串反转。",
           "```python\ndef reverse_text(s):\n    return s[::-1]\n```\n例如 reverse_text(\"abc\") 返回 \"cba\"。"),
          ("那怎么判断一个字符串是不是回文？",
           "```python\ndef is_palindrome(s):\n    return s == s[::-1]\n```\n例如 is_palindrome(\"上海自来水来自海上\") 返回 True。")),
        D(("Python里怎么读取一个文本文件的全部内容？",
           "```python\nwith open(\"notes.txt\", encoding=\"utf-8\") as f:\n    text = f.read()\n```\n使用 with 语句，读完后文件会自动关闭。")),
        D(("解释一下Python中的for循环。",
           "for循环用来依次取出一个序列中的每个元素，例如：\n```python\nfor name in [\"小明\", \"小红\"]:\n    print(name)\n```\n会依次打印“小明”和“小红”。")),
        D(("用Python找出列表中的最大值，不能用max函数。",
           "```python\ndef find_max(nums):\n    best = nums[0]\n    for x in nums[1:]:\n        if x > best:\n            best = x\n    return best\n```\n这里假设列表不为空。")),
    ]


def en_code_dialogues():
    return [
        D(("Write a Python function that returns the factorial of n.",
           "```python\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n```\n"
           "For example, factorial(5) returns 120."),
          ("Can you write it recursively instead?",
           "```python\ndef factorial(n):\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n```"),
          ("What happens if I pass a negative number?",
           "Both versions return 1, which is wrong. Add a check at the start: "
           "`if n < 0: raise ValueError(\"n must be non-negative\")`.")),
        D(("How do I check if a key exists in a Python dictionary?",
           "Use the `in` operator:\n```python\nif \"name\" in person:\n    print(person[\"name\"])\n```\n"
           "You can also use `person.get(\"name\")`, which returns None if the key is missing.")),
        D(("Write a Python function to count the vowels in a string.",
           "```python\ndef count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in \"aeiou\")\n```\n"
           "For example, count_vowels(\"Hello World\") returns 3.")),
        D(("What does len() do in Python?",
           "len() returns the number of items in an object, such as the characters in a string or the elements in a "
           "list. For example, len([1, 2, 3]) is 3 and len(\"hi\") is 2.")),
        D(("Write a Python one-liner that keeps only the even numbers in a list called nums.",
           "```python\nevens = [n for n in nums if n % 2 == 0]\n```"),
          ("And how would I square them at the same time?", "```python\nsquares = [n * n for n in nums if n % 2 == 0]\n```")),
        D(("How do I remove duplicates from a list in Python but keep the order?",
           "Use dict.fromkeys, which keeps the first occurrence of each item:\n```python\nunique = list(dict.fromkeys(items))\n```")),
        D(("Write a function that checks whether a year is a leap year.",
           "```python\ndef is_leap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n```\n"
           "So 2024 and 2000 are leap years, but 1900 is not.")),
        D(("What is the difference between == and is in Python?",
           "== checks whether two values are equal, while `is` checks whether two names refer to the very same "
           "object. Use `is` mainly for comparisons with None, as in `if x is None`.")),
        D(("Write a Python function that converts Celsius to Fahrenheit.",
           "```python\ndef c_to_f(c):\n    return c * 9 / 5 + 32\n```\nFor example, c_to_f(100) returns 212.0."),
          ("Now the reverse conversion, please.",
           "```python\ndef f_to_c(f):\n    return (f - 32) * 5 / 9\n```\nFor example, f_to_c(32) returns 0.0.")),
    ]


def zh_advice_dialogues():
    return [
        D(("晚上总是睡不着，有什么建议？",
           "1. 每天固定时间睡觉和起床；\n2. 睡前一小时不看手机；\n3. 下午以后少喝咖啡和浓茶；\n4. 白天适当运动；\n5. 保持卧室安静、昏暗、凉爽。"),
          ("把这些睡眠建议浓缩成一句话。", "规律作息，睡前远离手机和咖啡，白天多动一动。")),
        D(("怎样才能坚持背英语单词？",
           "设定小目标，比如每天10个；利用碎片时间复习；按遗忘规律隔天、隔周回顾；把新单词用在句子里；记录进度，给自己正反馈。"),
          ("如果中途断了几天怎么办？", "不用自责，也不要想一次补回所有欠下的量。从今天重新开始，先复习最近学过的词，再慢慢恢复原来的节奏。")),
        D(("第一次去面试要注意什么？",
           "提前了解公司和岗位；准备好自我介绍；穿着整洁得体；提前十分钟到达；回答问题真诚具体；最后可以礼貌地问一两个关于工作的问题。"),
          ("自我介绍大概说多长时间合适？", "一般一到两分钟，讲清楚教育背景、相关经历，以及自己为什么适合这个岗位就可以了。")),
        D(("和朋友吵架了，怎么和好？",
           "先让自己冷静下来，再主动联系对方。真诚地说出自己的感受，也认真听对方的想法；如果自己有错，就直接道歉。不必争输赢，关系更重要。"),
          ("如果对方一直不回消息呢？", "给对方一些时间和空间，不要连续发消息催促。过几天可以再简单问候一次，表明你仍然珍惜这段友谊。")),
        D(("怎样养成每天运动的习惯？",
           "从很小的量开始，比如每天快走15分钟；固定运动的时间和地点；找个伙伴互相督促；记录每天的完成情况；选择自己真正喜欢的运动。"),
          ("上班族没时间怎么办？", "可以把运动融入日常：提前一站下车步行、用爬楼梯代替坐电梯、午休时散步10分钟，积少成多。")),
        D(("要去外地上大学了，需要准备哪些东西？",
           "证件类：录取通知书、身份证、证件照；生活类：换洗衣物、洗漱用品、常用药品；学习类：电脑、文具。另外备些现金和充电器。"),
          ("哪些东西可以到了学校再买？", "被褥、脸盆、衣架、台灯等体积大或容易买到的日用品，都可以到学校附近再买，省得一路搬运。")),
        D(("怎样克服当众讲话时的紧张？",
           "充分准备并多次演练；开场前深呼吸；把注意力放在要传达的内容上，而不是别人的眼光；从小场合开始练习，比如先在小组会上发言。"),
          ("把这些要点缩短成三条。", "1. 充分准备；\n2. 深呼吸放松；\n3. 从小场合多练。")),
        D(("如何合理安排零花钱？",
           "拿到钱先存一部分，比如三成；剩下的分成必需开支和自由开支；买东西前想一想是“需要”还是“想要”；每周记一次账。"),
          ("给初中生举个具体的例子。", "假设每周零花钱50元：先存15元，早餐和文具预留25元，剩下10元自由支配，比如买一本杂志。")),
        D(("工作总是拖延，怎么办？",
           "把大任务拆成十几分钟就能完成的小步骤；先做最简单的一步让自己动起来；给每个步骤定截止时间；做事时把手机放远一点。")),
    ]


def en_advice_dialogues():
    return [
        D(("How can I focus better when studying?",
           "Put your phone in another room, study in 25-minute blocks with short breaks, set one clear goal for each "
           "session, and work in a quiet, tidy space."),
          ("Make it shorter.", "Phone away, short timed blocks, one goal at a time.")),
        D(("What should I pack for a weekend hiking trip?",
           "Comfortable boots, a rain jacket, warm layers, plenty of water, snacks, a map or offline app, sunscreen, "
           "a small first-aid kit and a charged phone."),
          ("What can I leave out if my bag is small?",
           "Skip extra outfits and bulky gadgets. Keep the water, layers, rain jacket, first-aid kit and map—those are the essentials.")),
        D(("I'm nervous about starting a new job. Any tips?",
           "Arrive a little early, learn people's names, ask questions instead of guessing, take notes, and don't "
           "expect to know everything in the first weeks. Everyone needs time to settle in."),
          ("Put that in one sentence.", "Be early, be curious, take notes, and give yourself time to learn.")),
        D(("How do I save money on groceries?",
           "Plan your meals for the week, shop with a list, choose store brands, avoid shopping when hungry, buy "
           "seasonal produce, and use up leftovers before buying more."),
          ("Which of those tips usually saves the most?",
           "For most people, planning meals and sticking to a list saves the most, because it cuts impulse buys and food waste at the same time.")),
        D(("How can I get better at remembering people's names?",
           "Repeat the name when you are introduced (\"Nice to meet you, Priya\"), use it once more in the "
           "conversation, link it to something about the person, and write it down afterwards."),
          ("What if I've already forgotten someone's name?",
           "Just be honest and friendly: \"I'm sorry, I've forgotten your name.\" Most people don't mind, and it's better than avoiding them.")),
        D(("How can I drink more water during the day?",
           "Keep a refillable bottle on your desk, drink a glass with every meal, set a few reminders, and add lemon "
           "or cucumber if you find plain water boring."),
          ("Give me a simple daily plan.",
           "Morning: a glass after waking. Work: refill your bottle twice. Meals: a glass with lunch and dinner. Evening: one small glass.")),
    ]


def zh_definition_dialogues():
    return [
        D(("什么是人工智能？",
           "人工智能是让计算机模拟人类智能的技术，比如理解语言、识别图像、下棋和做决策。常见的应用有语音助手、推荐系统和自动驾驶。")),
        D(("解释一下“通货膨胀”。", "通货膨胀是指一段时间内物价总体水平持续上涨，同样多的钱能买到的东西变少了，也就是货币的购买力下降。")),
        D(("什么是成语？举两个例子。", "成语是汉语中长期沿用、结构固定的短语，大多是四个字，常带有典故。例如“守株待兔”“画蛇添足”。"),
          ("讲讲“画蛇添足”的意思。", "比喻做了多余的事，反而弄巧成拙。故事里几个人比赛画蛇，一人先画完又给蛇添上脚，结果输了。")),
        D(("什么是GDP？", "GDP即国内生产总值，指一个国家或地区在一定时期内生产的全部最终产品和服务的市场价值，常用来衡量经济规模。")),
        D(("“碳中和”是什么意思？",
           "碳中和是指国家、企业或个人在一定时间内排放的二氧化碳，通过植树造林、节能减排等方式抵消掉，实现二氧化碳净排放为零。")),
        D(("什么是云计算？", "云计算是通过互联网按需使用服务器、存储和软件等计算资源的方式，用户不必自己购买和维护硬件，用多少付多少。")),
        D(("解释“光年”这个词。", "光年是长度单位，不是时间单位，指光在真空中一年所走的距离，约9.46万亿千米，常用来表示天体之间的距离。")),
        D(("什么是二十四节气？",
           "二十四节气是中国古代根据太阳在黄道上的位置划分的时令，用来指导农事，如立春、清明、夏至、秋分、冬至等。2016年被列入联合国教科文组织人类非物质文化遗产代表作名录。"),
          ("冬至这天有什么特点？", "冬至是北半球一年中白天最短、黑夜最长的一天。中国北方有吃饺子的习俗，南方一些地方吃汤圆。")),
        D(("什么叫“质数”？", "质数是大于1、且只能被1和它本身整除的自然数，例如2、3、5、7、11。2是唯一的偶数质数。"),
          ("20以内的质数有哪些？", "2、3、5、7、11、13、17、19，一共8个。")),
        D(("什么是区块链？用简单的话说。",
           "区块链可以理解为一本由很多人共同保存的账本。每一页（区块）记录一批交易，并和上一页连在一起，想偷偷修改某一页几乎不可能。")),
    ]


def en_definition_dialogues():
    return [
        D(("What is a noun?", "A noun is a word that names a person, place, thing or idea, such as teacher, Paris, apple or freedom."),
          ("And a verb?", "A verb describes an action or a state, such as run, eat, think or be.")),
        D(("Define photosynthesis in one sentence.",
           "Photosynthesis is the process in which plants use sunlight, water and carbon dioxide to make sugar and release oxygen.")),
        D(("What does 'procrastinate' mean?",
           "To procrastinate means to keep putting off something you should do, often by doing easier or more pleasant things instead.")),
        D(("What is an algorithm?",
           "An algorithm is a step-by-step set of instructions for solving a problem, like a recipe. Computers follow "
           "algorithms to sort lists, find routes and much more.")),
        D(("What is a mammal?",
           "A mammal is a warm-blooded animal that has hair or fur and feeds its young with milk. Dogs, whales, bats and humans are all mammals.")),
        D(("What is a budget?", "A budget is a plan for how you will spend and save your money over a period of time, such as a month.")),
        D(("What does 'biodiversity' mean?",
           "Biodiversity is the variety of living things in an area—plants, animals, fungi and microorganisms—and the ecosystems they form.")),
        D(("What is a haiku?",
           "A haiku is a short Japanese poem with three lines of five, seven and five syllables, often about nature or a season.")),
        D(("What does an interest rate mean?",
           "An interest rate is the percentage charged for borrowing money, or paid to you for saving it, usually stated per year.")),
    ]


def zh_list_dialogues():
    return [
        D(("推荐几部适合全家一起看的动画电影。", "1.《千与千寻》\n2.《寻梦环游记》\n3.《哪吒之魔童降世》\n4.《疯狂动物城》\n5.《龙猫》"),
          ("其中哪部是中国的？", "《哪吒之魔童降世》是中国的动画电影，2019年上映。")),
        D(("列出五种常见的水果。", "苹果、香蕉、橙子、葡萄、西瓜，都是日常生活中很容易买到的水果。"),
          ("这几种里哪种维生素C含量比较高？", "这几种里橙子的维生素C含量比较高。另外，猕猴桃和鲜枣的维生素C也很丰富。")),
        D(("推荐三本适合小学生读的书。", "1.《夏洛的网》——E.B.怀特\n2.《小王子》——圣埃克苏佩里\n3.《稻草人》——叶圣陶"),
          ("再推荐两本科普类的。", "1.《昆虫记》——法布尔\n2.《森林报》——维·比安基")),
        D(("周末在家可以做些什么？列几项。", "1. 整理房间；\n2. 学做一道新菜；\n3. 读一本书；\n4. 做一次居家锻炼；\n5. 和家人玩桌游。"),
          ("如果天气好，出门可以做什么？", "可以去公园骑车、到郊外爬山、去菜市场逛逛，或者约朋友野餐。")),
        D(("去北京旅游有哪些必去的景点？", "故宫、天安门广场、八达岭长城、颐和园、天坛，还可以逛逛南锣鼓巷一带的胡同。"),
          ("故宫需要提前预约吗？", "需要。故宫博物院实行实名预约购票，建议提前在官方渠道预约；周一通常闭馆（法定节假日除外）。")),
        D(("列举中国古典四大名著。", "《红楼梦》《西游记》《水浒传》《三国演义》。"),
          ("哪一部讲的是取经的故事？", "《西游记》，讲唐僧师徒四人历经八十一难，去西天取经的故事。")),
        D(("推荐几种适合新手养的植物。", "绿萝、吊兰和虎皮兰都比较耐阴；仙人掌和多肉植物耐旱，放在阳光充足的地方、少浇水就行。")),
        D(("说出三种可再生能源。", "太阳能、风能和水能。它们可以不断得到补充，使用过程中的碳排放也很少。")),
    ]


def en_list_dialogues():
    return [
        D(("List five fruits that are high in vitamin C.", "Oranges, kiwis, strawberries, guavas and papayas."),
          ("Which vegetables are also good sources?", "Red bell peppers, broccoli, Brussels sprouts and kale.")),
        D(("Recommend three classic novels in English.",
           "1. Jane Eyre – Charlotte Brontë\n2. Great Expectations – Charles Dickens\n3. Frankenstein – Mary Shelley"),
          ("Give me two more by American authors.",
           "1. The Great Gatsby – F. Scott Fitzgerald\n2. To Kill a Mockingbird – Harper Lee")),
        D(("Name the seven continents.", "Africa, Antarctica, Asia, Australia (Oceania), Europe, North America and South America."),
          ("Which one is the largest?", "Asia is the largest, both in area and in population.")),
        D(("Give me four ideas for a rainy afternoon.",
           "1. Bake cookies.\n2. Start a jigsaw puzzle.\n3. Watch a classic film.\n4. Write a letter to an old friend.")),
        D(("List the primary colours of light.", "Red, green and blue. Mixing all three in equal amounts gives white light.")),
        D(("What are some good habits for healthy teeth?",
           "Brush twice a day with fluoride toothpaste, floss daily, limit sugary drinks and snacks, and see a dentist for regular check-ups.")),
        D(("Recommend three games for a family night.",
           "1. Ticket to Ride (a train board game)\n2. Carcassonne (a tile-laying game)\n3. Uno (a quick card game)"),
          ("Which is easiest for a six-year-old?", "Uno is the easiest: the rules are simple and a round only takes a few minutes.")),
    ]


# ----------------------------------------------------------------------------------------------
# assembly, checks, writing
# ----------------------------------------------------------------------------------------------
def build_dialogues():
    """All dialogues, canned conversation first, the rest in a fixed-seed shuffled order."""
    rng = random.Random(SEED)
    body = []
    body += zh_capital_dialogues()
    body += en_capital_dialogues()
    body += zh_arithmetic_dialogues(rng)
    body += en_arithmetic_dialogues(rng)
    body += zh_translation_dialogues()
    body += en_translation_dialogues()
    body += zh_classification_dialogues()
    body += en_classification_dialogues()
    body += zh_summary_dialogues()
    body += en_summary_dialogues()
    body += zh_rewrite_dialogues()
    body += en_rewrite_dialogues()
    body += zh_extraction_dialogues()
    body += en_extraction_dialogues()
    body += zh_knowledge_dialogues()
    body += en_knowledge_dialogues()
    body += zh_creative_dialogues()
    body += en_creative_dialogues()
    body += zh_code_dialogues()
    body += en_code_dialogues()
    body += zh_advice_dialogues()
    body += en_advice_dialogues()
    body += zh_definition_dialogues()
    body += en_definition_dialogues()
    body += zh_list_dialogues()
    body += en_list_dialogues()
    rng.shuffle(body)
    return [canned_dialogue()] + body


CJK = re.compile(r"[\u4e00-\u9fff]")


def is_chinese(dialogue):
    return any(CJK.search(t["instruction"] + t["input"] + t["output"]) for t in dialogue)


def check(data):
    """Raise ValueError if the data breaks a rule of the format or of this sample set."""
    seen = {}
    for d_i, dialogue in enumerate(data):
        if not isinstance(dialogue, list) or not 1 <= len(dialogue) <= 5:
            raise ValueError(f"dialogue {d_i}: must be a list of 1 to 5 turns")
        for t_i, turn in enumerate(dialogue):
            where = f"dialogue {d_i} turn {t_i}"
            if not isinstance(turn, dict) or list(turn) != ["instruction", "input", "output"]:
                raise ValueError(f"{where}: keys must be exactly instruction, input, output")
            if not all(isinstance(v, str) for v in turn.values()):
                raise ValueError(f"{where}: every value must be str")
            if not turn["instruction"].strip() or not turn["output"].strip():
                raise ValueError(f"{where}: empty instruction or output")
            if len(turn["instruction"]) >= MAX_INSTRUCTION_CHARS:
                raise ValueError(f"{where}: instruction too long")
            if len(turn["output"]) > MAX_OUTPUT_CHARS:
                raise ValueError(f"{where}: output too long ({len(turn['output'])} chars)")
            if turn["instruction"] in seen:
                raise ValueError(f"{where}: instruction {turn['instruction']!r} repeats {seen[turn['instruction']]}")
            seen[turn["instruction"]] = where


def summary(data):
    n = len(data)
    multi = sum(len(d) > 1 for d in data)
    with_input = sum(any(t["input"] for t in d) for d in data)
    zh = sum(is_chinese(d) for d in data)
    chars = sum(len(v) for d in data for t in d for v in t.values())
    return (f"{n} dialogues, {sum(len(d) for d in data)} turns; multi-turn {multi} ({100 * multi / n:.0f}%); "
            f"with input {with_input} ({100 * with_input / n:.0f}%); Chinese {zh} ({100 * zh / n:.0f}%), "
            f"English {n - zh} ({100 * (n - zh) / n:.0f}%); {chars} characters of text")


def _atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it onto path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_files(data, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    pkl_path = os.path.join(out_dir, PKL_NAME)
    json_path = os.path.join(out_dir, JSON_NAME)
    _atomic_write(pkl_path, lambda f: pickle.dump(data, f, protocol=4))
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    _atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    return pkl_path, json_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the sample instruction-tuning dialogues (Chinese and English) as "
                    f"{PKL_NAME} and {JSON_NAME}. Deterministic: the same files every run.")
    parser.add_argument("--out_dir", default=os.path.join("data", "test"),
                        help="directory to write the two files into (created if missing; default: data/test)")
    args = parser.parse_args(argv)
    data = build_dialogues()
    try:
        check(data)
    except ValueError as e:
        print(f"error: generated data is invalid: {e}", file=sys.stderr)
        return 1
    try:
        paths = write_files(data, args.out_dir)
    except OSError as e:
        print(f"error: cannot write to {args.out_dir}: {e}", file=sys.stderr)
        return 2
    print(summary(data))
    for p in paths:
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

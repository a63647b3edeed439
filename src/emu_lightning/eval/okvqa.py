"""OK-VQA: its answer stemming and :class:`OKVQAEval`. Its v1.1 references are stemmed (each answer's ``answer``
beside its ``raw_answer``), so a prediction is stemmed the same way before the VQA accuracy scores it."""

from __future__ import annotations

import re
from typing import Any

from emu_lightning.eval.callbacks import VQAEval
from emu_lightning.eval.metrics import postprocess_vqa_answer

# OK-VQA v1.1 stems its reference answers (each answer's `answer` beside its `raw_answer`), so a prediction is stemmed
# the same way before scoring. OpenFlamingo's OK-VQA evaluation (open_flamingo/eval/ok_vqa_utils.py) does it with nltk
# (Treebank tokenizer, perceptron POS tagger, WordNet lemmatizer: data that nltk downloads) and `inflection`, none of
# which this project has or may download; okvqa_stem follows the same rule with hand-written approximations of the
# tagger and the lemmatizer. Its word table (the dataset's own irregular stems, which OpenFlamingo lists) is kept
# entry for entry, since those are facts of the references, not of any algorithm.
_OKVQA_MANUAL = dict(pair.split(":") for pair in """
police:police las:las vegas:vegas yes:yes jeans:jean hell's:hell domino's:domino morning:morn clothes:cloth are:are
riding:ride leaves:leaf dangerous:danger clothing:cloth texting:text kiting:kite firefighters:firefight ties:tie
married:married teething:teeth gloves:glove tennis:tennis dining:dine directions:direct waves:wave christmas:christmas
drives:drive pudding:pud coding:code plating:plate quantas:quanta hornes:horn graves:grave mating:mate paned:pane
alertness:alert sunbathing:sunbath tenning:ten wetness:wet urinating:urine sickness:sick braves:brave
firefighting:firefight lenses:lens reflections:reflect backpackers:backpack eatting:eat designers:design
curiousity:curious playfulness:play blindness:blind hawke:hawk tomatoe:tomato rodeoing:rodeo brightness:bright
circuses:circus skateboarders:skateboard staring:stare electronics:electron electicity:elect mountainous:mountain
socializing:social hamburgers:hamburg caves:cave transitions:transit wading:wade creame:cream toileting:toilet
sautee:saute buildings:build belongings:belong stockings:stock walle:wall cumulis:cumuli travelers:travel
conducter:conduct browsing:brows pooping:poop haircutting:haircut toppings:top hearding:heard sunblocker:sunblock
bases:base markings:mark mopeds:mope kindergartener:kindergarten pies:pie scrapbooking:scrapbook couponing:coupon
meetings:meet elevators:elev lowes:low men's:men childrens:children shelves:shelve paintings:paint raines:rain
paring:pare expressions:express routes:rout pease:peas vastness:vast awning:awn boy's:boy drunkenness:drunken
teasing:teas conferences:confer ripeness:ripe suspenders:suspend earnings:earn reporters:report kid's:kid
containers:contain corgie:corgi porche:porch microwaves:microwave batter's:batter sadness:sad apartments:apart
oxygenize:oxygen striping:stripe purring:pure professionals:profession piping:pipe farmer's:farmer potatoe:potato
emirates:emir womens:women veteran's:veteran wilderness:wilder propellers:propel alpes:alp charioteering:chariot
swining:swine illness:ill crepte:crept adhesives:adhesive regent's:regent decorations:decor rabbies:rabbi
overseas:oversea travellers:travel casings:case smugness:smug doves:dove nationals:nation mustange:mustang ringe:ring
gondoliere:gondolier vacationing:vacate reminders:remind baldness:bald settings:set glaced:glace coniferous:conifer
revelations:revel personals:person daughter's:daughter badness:bad projections:project polarizing:polar
vandalizers:vandal minerals:miner protesters:protest controllers:control weddings:wed sometimes:sometime earing:ear
""".split())  # fmt: skip
# Tokens: numbers, words (with their hyphens and apostrophes) and punctuation marks. nltk's tokenizer also splits
# clitics ("men's" -> "men 's"), so the table's "men's" entry never applies there; kept whole, it does, as in the
# dataset's own stems.
_OKVQA_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-']\w+)*|[^\w\s]")
_ING_NOT_VERBS = frozenset("something nothing anything everything during ceiling evening".split())
"""-ing words that are not verb forms: WordNet's verb lemmatizer leaves them as they are."""
_NOT_PLURAL = frozenset(
    "yes this his its was is has does us as thus plus always perhaps news series species physics mathematics "
    "economics politics athletics gymnastics less unless across bus gas lens iris canvas atlas chaos cactus "
    "octopus virus status alias bias analysis basis crisis thesis diagnosis".split()
)
"""Words ending in "s" that the POS tagger would not call plural nouns (or that singularize leaves alone)."""
_UNCOUNTABLE = frozenset("equipment fish information jeans money rice series sheep species".split())
_IRREGULAR_PLURALS = {"people": "person", "children": "child", "men": "man", "women": "woman", "mice": "mouse"}
# Singular forms of regular plurals, most specific first (the English rules of inflection's `singularize`).
_SINGULAR_RULES = tuple((re.compile(p), r) for p, r in (
    (r"(quiz)zes$", r"\1"), (r"(matr)ices$", r"\1ix"), (r"(vert|ind)ices$", r"\1ex"), (r"^(ox)en$", r"\1"),
    (r"(alias|status)(es)?$", r"\1"), (r"(octop|vir)(us|i)$", r"\1us"), (r"^(a)x[ie]s$", r"\1xis"),
    (r"(cris|test)(is|es)$", r"\1is"), (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)(es)?$", r"\1"),
    (r"(m|l)ice$", r"\1ouse"), (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"), (r"(s)eries$", r"\1eries"),
    (r"([^aeiouy]|qu)ies$", r"\1y"), (r"([lr])ves$", r"\1f"), (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"),
    (r"([^f])ves$", r"\1fe"), (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)(sis|ses)$", r"\1sis"),
    (r"(n)ews$", r"\1ews"), (r"(ss)$", r"\1"), (r"s$", ""),
))  # fmt: skip
_VOWELS = "aeiou"


def singularize(word: str) -> str:
    """The singular of an English plural noun, by the rules of the ``inflection`` package's ``singularize``:
    uncountable words unchanged, irregular plurals (people, children, -men, mice), then suffix rules
    (``boxes`` -> ``box``, ``berries`` -> ``berry``, ``knives`` -> ``knife``, ``dogs`` -> ``dog``)."""
    if word in _UNCOUNTABLE:
        return word
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    for pattern, replacement in _SINGULAR_RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word, count=1)
    return word


def _verb_lemma_of_ing(word: str) -> str:
    """The verb an -ing form comes from (``running`` -> ``run``, ``making`` -> ``make``, ``skiing`` -> ``ski``): an
    approximation of WordNet's verb lemmatizer, which checks candidate stems against its lexicon; a stem without a
    vowel (``thing``, ``bring``, ``spring``) is not a verb form and is left alone."""
    stem = word[:-3]
    if word in _ING_NOT_VERBS or not any(c in _VOWELS + "y" for c in stem):
        return word
    if len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS + "lsz":
        return stem[:-1]  # running -> run, swimming -> swim (but falling -> fall, dressing -> dress)
    groups = len(re.findall(f"[{_VOWELS}]+", stem))
    if stem.endswith(("c", "v", "u", "dg", "rg")) or (
        groups == 1 and re.search(f"[{_VOWELS}][^{_VOWELS}wxy]$", stem) and not re.search(f"[{_VOWELS}]{{2}}", stem)
    ):
        return stem + "e"  # making -> make, dancing -> dance, driving -> drive, using -> use (not eating, cooking)
    return stem


def _looks_plural(word: str) -> bool:
    """Whether the POS tagger would likely call ``word`` a plural noun (NNS): an irregular plural, or a word ending in
    "s" that is not a known exception and not ``-ss``, ``-us``, ``-is``, ``-ous``."""
    if word in _IRREGULAR_PLURALS:
        return True
    return (word.isalpha() and len(word) > 2 and word.endswith("s") and word not in _NOT_PLURAL
            and not word.endswith(("ss", "us", "is", "ous")))  # fmt: skip


def okvqa_stem(text: str) -> str:
    """Stem an answer as OK-VQA v1.1 stems its references, so that a prediction can match them.

    The rule of OpenFlamingo's ``OKVQAStemmer``: tokenize; a word of the dataset's own table keeps its listed stem
    (``clothes`` -> ``cloth``, ``riding`` -> ``ride``); a word ending in "ing" becomes its verb (``running`` ->
    ``run``); a plural noun becomes singular (``dogs`` -> ``dog``); tokens are joined by spaces. OpenFlamingo tags
    the parts of speech with nltk's tagger and finds verbs with WordNet; neither is available offline here, so a
    word ending in "s" counts as a plural noun unless it is a known exception (``yes``, ``bus``, ``glass``, ...) and
    -ing verbs are found by spelling rules: most answers stem the same, a few (rare verbs, ``-s`` verbs) may not.
    Words keep their apostrophes (nltk splits ``men's`` into ``men 's``), so the table's ``men's`` -> ``men`` applies.

    Args:
        text: an answer, already through the task's answer post-processing.

    Returns:
        The stemmed answer.
    """
    out = []
    for word in _OKVQA_TOKEN.findall(text):
        if word in _OKVQA_MANUAL:
            word = _OKVQA_MANUAL[word]
        elif word.endswith("ing") and word.isalpha():
            word = _verb_lemma_of_ing(word)
        elif _looks_plural(word):
            word = singularize(word)
        out.append(word)
    return " ".join(out)


def postprocess_okvqa_answer(text: str) -> str:
    """OK-VQA's answer post-processing: Emu's short answer (:func:`postprocess_vqa_answer`), then stemmed as the
    OK-VQA references are (:func:`okvqa_stem`), as OpenFlamingo scores OK-VQA."""
    return okvqa_stem(postprocess_vqa_answer(text))


class OKVQAEval(VQAEval):
    """Zero-/few-shot OK-VQA: :class:`VQAEval` on OK-VQA's files, with its answers stemmed as its references are.

    OK-VQA's release is in the VQAv2 format: ``OpenEnded_mscoco_val2014_questions.json`` and
    ``mscoco_val2014_annotations.json`` over the COCO val2014 images (the defaults' ``COCO_val2014_...jpg``), and the
    ``train2014`` files for demonstrations. OK-VQA v1.1 stems its reference answers (``raw_answer`` "riding", ``answer``
    "ride"), so predictions are stemmed too before the VQA accuracy, as OpenFlamingo scores OK-VQA (the paper's
    comparison point): :func:`postprocess_okvqa_answer`. Scores are logged as
    ``eval/okvqa_<k>shot``; the arguments are :class:`VQAEval`'s.
    """

    task_name = "okvqa"

    def task_options(self) -> dict[str, Any]:
        return {"answer_postprocess": postprocess_okvqa_answer}

"""The nine task families of the synthetic task (mgsr/data/synthetic.py): one generator per family,
rng -> (instruction, input, references), over the word tables of synthetic_words.py.

Changing a generator changes the generated records: bump `SYNTHETIC_VERSION` in synthetic.py with it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mgsr.data.synthetic_words import (
    ANIMALS,
    CLASS_PLURAL,
    COUNT_ITEMS,
    DAYS,
    EXTRA_PLURALS,
    LIST_WORDS,
    NAMES,
    NUMBER_WORDS,
    OBJECTS,
    PLACES,
    PLANTS,
    TRANSITIVE,
    VERBS,
)

_Gen = Callable[[random.Random], tuple[str, str, list[str]]]  # rng -> (instruction, input, references)


def _a(word: str) -> str:
    """Word with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    name, other = rng.sample(list(NAMES), 2)
    pron, items = NAMES[name], rng.choice(COUNT_ITEMS)
    kind = rng.randrange(9)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == 0:
        return (f"{name} has {a} {items}. {_cap(pron)} buys {b} more. How many {items} does {name} have now?",
                "", [f"{name} has {a + b} {items} now."])
    if kind == 1:
        return (f"{name} has {a} {items} and {other} has {b} {items}. How many {items} do they have together?",
                "", [f"They have {a + b} {items} together."])
    a, b = max(a, b) + 2, min(a, b)  # keeps differences >= 2, so "items" stays plural
    if kind == 2:
        return (f"{name} had {a} {items} and gave {b} of them to {other}. How many {items} does {name} have left?",
                "", [f"{name} has {a - b} {items} left."])
    if kind == 3:
        return (f"There were {a} {items} on the table. {name} took {b} of them. How many {items} are on the "
                f"table now?", "", [f"There are {a - b} {items} on the table now."])
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (f"There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
                "", [f"There are {a * b} {items} in total."])
    if kind == 5:
        op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b)])
        return (f"What is {a} {word} {b}?", "", [f"{a} {word} {b} is {value}."])
    if kind == 6:
        op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b)])
        return (f"{rng.choice(['Compute', 'Calculate'])} {a} {op} {b}.", "", [str(value)])
    if kind == 7:
        x, y = rng.sample(range(1, 100), 2)
        return (f"Which number is larger, {x} or {y}?", "", [f"{max(x, y)} is larger than {min(x, y)}."])
    start = rng.randint(1, 30)
    end = start + rng.randint(3, 12)
    return (f"Count from {start} to {end}.", "", [", ".join(str(i) for i in range(start, end + 1))])


def _list_ops(rng: random.Random) -> tuple[str, str, list[str]]:
    words = rng.sample(LIST_WORDS, rng.randint(3, 7))
    text = ", ".join(words)
    kind = rng.randrange(5)
    if kind == 0:
        inst = rng.choice(["Sort the words in alphabetical order.", "Put these words in alphabetical order.",
                           "Arrange the following words from A to Z."])
        return inst, text, [", ".join(sorted(words))]
    if kind == 1:
        inst = rng.choice(["Reverse the order of the words in the list.", "Write the list backwards."])
        return inst, text, [", ".join(reversed(words))]
    if kind == 2:
        inst = rng.choice(["How many words are in the list?", "Count the words in the list."])
        return inst, text, [f"There are {len(words)} words in the list."]
    if kind == 3:
        pos, word = rng.choice([("first", words[0]), ("last", words[-1])])
        return f"What is the {pos} word in the list?", text, [f"The {pos} word is {word}."]
    return "Which word in the list comes first in alphabetical order?", text, [min(words)]


def _category(rng: random.Random) -> tuple[str, str, list[str]]:
    kind = rng.randrange(4)
    if kind < 2:  # a plant of a colour
        cat = rng.choice(list(PLANTS))
        colour = rng.choice(sorted({c for cs in PLANTS[cat].values() for c in cs}))
        items = [i for i, cs in PLANTS[cat].items() if colour in cs]
        desc = rng.choice([f"{_a(colour)} {cat}", f"{_a(cat)} that is {colour}", f"{_a(cat)} that can be {colour}"])
        refs = [f"{_cap(_a(i))} is {_a(colour)} {cat}." for i in items]
    elif kind == 2:  # an animal of a class
        cls = rng.choice(sorted(CLASS_PLURAL))
        desc = rng.choice([_a(cls), f"an animal that is {_a(cls)}"])
        refs = [f"{_cap(_a(n))} is {_a(cls)}." for n, v in ANIMALS.items() if v[1] == cls]
    else:  # an animal with a property
        prop = rng.choice(["fly", "swim", "habitat", "food"])
        if prop in ("fly", "swim"):
            idx = 6 if prop == "fly" else 7
            desc = f"an animal that can {prop}"
            refs = [f"{_cap(_a(n))} can {prop}." for n, v in ANIMALS.items() if v[idx]]
        elif prop == "habitat":
            hab = rng.choice(sorted({v[4] for v in ANIMALS.values()}))
            desc = f"an animal that lives in the {hab}"
            refs = [f"The {n} lives in the {hab}." for n, v in ANIMALS.items() if v[4] == hab]
        else:
            food = rng.choice(sorted({v[5] for v in ANIMALS.values()}))
            desc = f"an animal that eats {food}"
            refs = [f"The {n} eats {food}." for n, v in ANIMALS.items() if v[5] == food]
    inst = rng.choice([f"Name {desc}.", f"Give an example of {desc}.", f"Can you name {desc}?",
                       f"Tell me the name of {desc}.", f"I need the name of {desc}.", f"Name one example of {desc}."])
    return inst, "", refs


def _describe_refs(name: str) -> tuple[list[str], list[str]]:
    """(one-sentence references, two-sentence references) for an animal or an object."""
    if name in ANIMALS:
        plural, cls, size, colour, hab, food, fly, _swim, _legs = ANIMALS[name]
        one = [f"{_cap(_a(name))} is {_a(size)} {colour} {cls} that lives in the {hab} and eats {food}.",
               f"The {name} is {size} and {colour}, and it lives in the {hab}, where it eats {food}.",
               f"{_cap(plural)} are {size} {colour} {CLASS_PLURAL[cls]} that live in the {hab} and eat {food}."]
        two = [f"{_cap(_a(name))} is {_a(size)} {colour} {cls}. It lives in the {hab} and eats {food}.",
               f"{_cap(plural)} are {size} and {colour}. They live in the {hab} and like to eat {food}.",
               f"The {name} is {_a(size)} {cls} that lives in the {hab}. It {'can' if fly else 'cannot'} fly, "
               f"and it eats {food}."]
        return one, two
    plural, material, colour, use = OBJECTS[name]
    one = [f"{_cap(_a(name))} is {_a(colour)} thing made of {material} that people use {use}.",
           f"The {name} is made of {material}, and people use it {use}.",
           f"{_cap(plural)} are made of {material}, and we use them {use}."]
    two = [f"{_cap(_a(name))} is made of {material}. People use it {use}.",
           f"The {name} is often {colour}. We use it {use}.",
           f"{_cap(plural)} are things made of {material}. People use them {use}."]
    return one, two


def _describe(rng: random.Random) -> tuple[str, str, list[str]]:
    name = rng.choice(list(ANIMALS) + list(OBJECTS))
    plural = ANIMALS[name][0] if name in ANIMALS else OBJECTS[name][0]
    one, two = _describe_refs(name)
    inst, refs = rng.choice([
        (f"Describe {_a(name)} in one sentence.", one), (f"Write one sentence about {plural}.", one),
        (f"Describe {_a(name)} in two sentences.", two), (f"Write two short sentences about {_a(name)}.", two),
        (f"What is {_a(name)} like?", one + two), (f"Tell me about the {name}.", one + two),
        (f"Give a short description of {_a(name)}.", one + two),
    ])
    return inst, "", refs


def _morphology(rng: random.Random) -> tuple[str, str, list[str]]:
    if rng.random() < 0.55:
        nouns = {n: v[0] for n, v in ANIMALS.items()} | {n: v[0] for n, v in OBJECTS.items()} | EXTRA_PLURALS
        noun = rng.choice(list(nouns))
        plural = nouns[noun]
        return rng.choice([
            (f"What is the plural of {noun}?", "", [f"The plural of {noun} is {plural}."]),
            (f'Write the plural form of the word "{noun}".', "", [plural]),
            (f"How do you say more than one {noun}?", "", [f"More than one {noun} is {plural}."]),
            (f"What is the singular of {plural}?", "", [f"The singular of {plural} is {noun}."]),
        ])
    verb = rng.choice(list(VERBS))
    third, past = VERBS[verb]
    return rng.choice([
        (f"What is the past tense of {verb}?", "", [f"The past tense of {verb} is {past}."]),
        (f'Write the past tense of the verb "{verb}".', "", [past]),
        (f'Change the verb "{verb}" to the past tense.', "", [past]),
        (f'What form of "{verb}" goes with he or she?', "", [f"He {third}. She {third}."]),
    ])


def _yes_no(rng: random.Random) -> tuple[str, str, list[str]]:
    name = rng.choice(list(ANIMALS))
    plural, cls, _size, _colour, hab, food, fly, swim, legs = ANIMALS[name]
    truth = rng.random() < 0.5
    kind = rng.randrange(6)
    if kind == 0:
        asked = cls if truth else rng.choice([c for c in sorted(CLASS_PLURAL) if c != cls])
        yes = f"Yes, {_a(name)} is {_a(cls)}."
        no = f"No, {_a(name)} is not {_a(asked)}. It is {_a(cls)}."
        return f"Is {_a(name)} {_a(asked)}?", "", [yes if asked == cls else no]
    if kind == 1:
        verb, able = rng.choice([("fly", fly), ("swim", swim)])
        ans = f"Yes, {plural} can {verb}." if able else f"No, {plural} cannot {verb}."
        return rng.choice([f"Can {_a(name)} {verb}?", f"Can {plural} {verb}?"]), "", [ans]
    if kind == 2:
        asked = hab if truth else rng.choice(sorted({v[4] for v in ANIMALS.values()} - {hab}))
        ans = (f"Yes, the {name} lives in the {hab}." if asked == hab
               else f"No, the {name} lives in the {hab}, not in the {asked}.")
        return f"Does {_a(name)} live in the {asked}?", "", [ans]
    if kind == 3:
        asked = food if truth else rng.choice(sorted({v[5] for v in ANIMALS.values()} - {food}))
        ans = f"Yes, {plural} eat {food}." if asked == food else f"No, {plural} eat {food}."
        return f"Do {plural} eat {asked}?", "", [ans]
    if kind == 4:
        asked = legs if truth else rng.choice([n for n in (0, 2, 4, 6) if n != legs])
        have = "no legs" if legs == 0 else f"{legs} legs"
        ans = f"Yes, {_a(name)} has {have}." if asked == legs else f"No, {_a(name)} has {have}."
        return f"Does {_a(name)} have {asked} legs?", "", [ans]
    asked = cls if truth else rng.choice([c for c in sorted(CLASS_PLURAL) if c != cls])
    return f"True or false: {plural} are {CLASS_PLURAL[asked]}.", "", ["True." if asked == cls else "False."]


def _rewrite(rng: random.Random) -> tuple[str, str, list[str]]:
    animal = rng.choice(list(ANIMALS))
    adj = rng.choice([ANIMALS[animal][2], ANIMALS[animal][3]])
    verb = rng.choice(TRANSITIVE)
    third, past = VERBS[verb]
    obj = rng.choice([f"{_a(rng.choice(list(OBJECTS)))}", f"the {rng.choice(list(ANIMALS))}"])
    tail = f"{obj} in the {rng.choice(PLACES)}."
    subj, subj_pl = f"The {adj} {animal}", f"The {adj} {ANIMALS[animal][0]}"
    present, pst, plural = f"{subj} {third} {tail}", f"{subj} {past} {tail}", f"{subj_pl} {verb} {tail}"
    kind = rng.randrange(6)
    if kind == 0:
        inst = rng.choice(["Rewrite the sentence in the past tense.", "Change the sentence to the past tense."])
        return inst, present, [pst]
    if kind == 1:
        return "Rewrite the sentence in the present tense.", pst, [present]
    if kind == 2:
        inst = rng.choice(["Repeat the sentence exactly.", "Copy the sentence word for word."])
        sentence = rng.choice([present, pst])
        return inst, sentence, [sentence]
    if kind == 3:
        return "Rewrite the sentence so that the subject is plural.", present, [plural]
    if kind == 4:
        sentence = rng.choice([present, pst])
        return "How many words are in the sentence?", sentence, [f"The sentence has {len(sentence.split())} words."]
    return "What is the subject of the sentence?", rng.choice([present, pst]), [f"The subject is {subj.lower()}."]


_OUTINGS = {  # place -> (what happened, short form for summaries)
    "market": ("bought {n} apples and some bread", "bought apples and bread"),
    "park": ("played football with {f}", "played football with {f}"),
    "library": ("read a book about {p}", "read a book about {p}"),
    "beach": ("found {n} shells in the sand", "found shells on the beach"),
    "zoo": ("saw {a} and took a picture of it", "saw {a}"),
    "farm": ("fed the {p} and the {q}", "fed the animals"),
}


def _reading(rng: random.Random) -> tuple[str, str, list[str]]:
    name, friend = rng.sample(list(NAMES), 2)
    pron, day, place = NAMES[name], rng.choice(DAYS), rng.choice(list(_OUTINGS))
    p, q = rng.sample([v[0] for v in ANIMALS.values()], 2)
    fill = dict(n=rng.choice(NUMBER_WORDS), f=friend, p=p, q=q, a=_a(rng.choice(list(ANIMALS))))
    did, did_short = (s.format(**fill) for s in _OUTINGS[place])
    feeling = rng.choice(["happy", "tired", "hungry", "excited"])
    text = (f"On {day}, {name} went to the {place}. {_cap(pron)} {did}. "
            f"{rng.choice(['Then', 'Later'])} {pron} walked home, and in the evening {pron} was very {feeling}.")
    inst, refs = rng.choice([
        ("Summarize the text in one sentence.", [f"{name} went to the {place} on {day} and {did_short}.",
                                                 f"On {day}, {name} {did} at the {place}.",
                                                 f"{name} visited the {place} and {did_short}."]),
        ("Who is the text about?", [f"The text is about {name}."]),
        (f"Where did {name} go?", [f"{name} went to the {place}."]),
        (f"On which day did {name} go to the {place}?", [f"{name} went to the {place} on {day}."]),
        (f"How did {name} feel in the evening?", [f"{name} was very {feeling}."]),
        ("Give the text a short title.", [f"{name} at the {_cap(place)}", f"A Day at the {_cap(place)}",
                                          f"{name} and the {_cap(place)}"]),
    ])
    return inst, text, refs


def _story(rng: random.Random) -> tuple[str, str, list[str]]:
    x, y = rng.sample(list(ANIMALS), 2)
    size, hab, place = ANIMALS[x][2], ANIMALS[x][4], rng.choice(PLACES)
    inst = rng.choice([f"Write a short story about {_a(x)} and {_a(y)}.",
                       f"Tell me a short story about {_a(x)} who meets {_a(y)}.",
                       f"Write a story for children about {_a(x)} and {_a(y)}."])
    refs = [
        f"Once upon a time, {_a(x)} lived in the {hab}. One day it met {_a(y)} near the {place}. "
        f"They played together all day and became good friends.",
        f"There was once {_a(size)} {x} who felt lonely. It went to the {place} and found {_a(y)}. "
        f"The {y} shared some {ANIMALS[y][5]} with it, and the {x} was happy again.",
        f"{_cap(_a(x))} and {_a(y)} were friends. Every morning they walked to the {place} together. "
        f"One day it rained, so they stayed home and told stories.",
    ]
    return inst, "", refs


FAMILIES: dict[str, _Gen] = {
    "arithmetic": _arithmetic, "list_ops": _list_ops, "category": _category, "describe": _describe,
    "morphology": _morphology, "yes_no": _yes_no, "rewrite": _rewrite, "reading": _reading, "story": _story,
}

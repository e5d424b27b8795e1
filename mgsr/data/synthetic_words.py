"""Word tables of the synthetic task (mgsr/data/synthetic.py): the few hundred words every record is built from.

Changing any entry changes the generated records: bump `SYNTHETIC_VERSION` in synthetic.py with it.
"""

from __future__ import annotations

# name: (plural, class, size, colour, habitat, food, can_fly, can_swim, legs)
ANIMALS: dict[str, tuple] = {
    "cat": ("cats", "mammal", "small", "grey", "house", "fish", False, False, 4),
    "dog": ("dogs", "mammal", "medium", "brown", "house", "meat", False, True, 4),
    "fox": ("foxes", "mammal", "small", "red", "forest", "mice", False, True, 4),
    "rabbit": ("rabbits", "mammal", "small", "white", "field", "carrots", False, False, 4),
    "horse": ("horses", "mammal", "big", "brown", "farm", "hay", False, True, 4),
    "cow": ("cows", "mammal", "big", "black", "farm", "grass", False, False, 4),
    "sheep": ("sheep", "mammal", "medium", "white", "farm", "grass", False, False, 4),
    "pig": ("pigs", "mammal", "medium", "pink", "farm", "corn", False, True, 4),
    "mouse": ("mice", "mammal", "tiny", "grey", "field", "seeds", False, False, 4),
    "lion": ("lions", "mammal", "big", "yellow", "grassland", "meat", False, True, 4),
    "bear": ("bears", "mammal", "big", "brown", "forest", "berries", False, True, 4),
    "whale": ("whales", "mammal", "huge", "blue", "sea", "fish", False, True, 0),
    "dolphin": ("dolphins", "mammal", "big", "grey", "sea", "fish", False, True, 0),
    "bat": ("bats", "mammal", "tiny", "black", "cave", "insects", True, False, 2),
    "owl": ("owls", "bird", "small", "brown", "forest", "mice", True, False, 2),
    "duck": ("ducks", "bird", "small", "white", "pond", "seeds", True, True, 2),
    "eagle": ("eagles", "bird", "big", "brown", "mountains", "fish", True, False, 2),
    "penguin": ("penguins", "bird", "small", "black", "ice", "fish", False, True, 2),
    "parrot": ("parrots", "bird", "small", "green", "jungle", "fruit", True, False, 2),
    "frog": ("frogs", "amphibian", "small", "green", "pond", "insects", False, True, 4),
    "snake": ("snakes", "reptile", "medium", "green", "grassland", "mice", False, True, 0),
    "turtle": ("turtles", "reptile", "small", "green", "pond", "plants", False, True, 4),
    "shark": ("sharks", "fish", "big", "grey", "sea", "fish", False, True, 0),
    "goldfish": ("goldfish", "fish", "tiny", "orange", "pond", "plants", False, True, 0),
    "bee": ("bees", "insect", "tiny", "yellow", "garden", "nectar", True, False, 6),
    "ant": ("ants", "insect", "tiny", "black", "garden", "seeds", False, False, 6),
    "butterfly": ("butterflies", "insect", "small", "orange", "garden", "nectar", True, False, 6),
}
CLASS_PLURAL = {c: c + "s" for c in ("mammal", "bird", "reptile", "amphibian", "insect")} | {"fish": "fish"}

# name: (plural, material, colour, what people use it for)
OBJECTS: dict[str, tuple] = {
    "cup": ("cups", "glass", "white", "to drink water"),
    "chair": ("chairs", "wood", "brown", "to sit on"),
    "table": ("tables", "wood", "brown", "to eat meals"),
    "pen": ("pens", "plastic", "blue", "to write letters"),
    "book": ("books", "paper", "red", "to read stories"),
    "ball": ("balls", "rubber", "red", "to play games"),
    "spoon": ("spoons", "metal", "grey", "to eat soup"),
    "lamp": ("lamps", "metal", "yellow", "to light a room"),
    "bag": ("bags", "cloth", "black", "to carry things"),
    "key": ("keys", "metal", "grey", "to open doors"),
    "bottle": ("bottles", "glass", "green", "to hold water"),
    "hat": ("hats", "cloth", "blue", "to keep the sun off"),
    "box": ("boxes", "paper", "brown", "to store things"),
    "clock": ("clocks", "wood", "white", "to tell the time"),
    "knife": ("knives", "metal", "grey", "to cut bread"),
    "bed": ("beds", "wood", "white", "to sleep"),
}
# category: item -> colours it can have
PLANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "fruit": {
        "apple": ("red", "green"), "cherry": ("red",), "strawberry": ("red",), "banana": ("yellow",),
        "lemon": ("yellow",), "pear": ("green", "yellow"), "grape": ("green", "purple"), "plum": ("purple",),
        "orange": ("orange",), "lime": ("green",), "peach": ("orange", "pink"),
    },
    "vegetable": {
        "carrot": ("orange",), "tomato": ("red",), "pea": ("green",), "potato": ("brown", "white"),
        "corn": ("yellow",), "pepper": ("red", "green", "yellow"), "cabbage": ("green", "purple"),
        "onion": ("white", "purple"), "pumpkin": ("orange",), "bean": ("green",),
    },
    "flower": {
        "rose": ("red", "white", "yellow", "pink"), "tulip": ("red", "yellow", "purple"), "daisy": ("white",),
        "sunflower": ("yellow",), "violet": ("purple",), "lily": ("white", "pink"),
    },
}
EXTRA_PLURALS = {
    "child": "children", "man": "men", "woman": "women", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "leaf": "leaves", "city": "cities", "baby": "babies", "bus": "buses", "glass": "glasses", "wolf": "wolves",
    "person": "people", "tree": "trees", "house": "houses", "day": "days", "toy": "toys", "story": "stories",
}
# base: (third person singular, past)
VERBS = {
    "run": ("runs", "ran"), "eat": ("eats", "ate"), "see": ("sees", "saw"), "go": ("goes", "went"),
    "find": ("finds", "found"), "swim": ("swims", "swam"), "fly": ("flies", "flew"), "sing": ("sings", "sang"),
    "write": ("writes", "wrote"), "take": ("takes", "took"), "make": ("makes", "made"), "give": ("gives", "gave"),
    "come": ("comes", "came"), "sleep": ("sleeps", "slept"), "jump": ("jumps", "jumped"),
    "play": ("plays", "played"), "walk": ("walks", "walked"), "like": ("likes", "liked"),
    "carry": ("carries", "carried"), "watch": ("watches", "watched"), "chase": ("chases", "chased"),
    "follow": ("follows", "followed"), "open": ("opens", "opened"), "drink": ("drinks", "drank"),
    "buy": ("buys", "bought"), "bring": ("brings", "brought"), "catch": ("catches", "caught"),
    "sit": ("sits", "sat"), "build": ("builds", "built"), "draw": ("draws", "drew"), "want": ("wants", "wanted"),
}
TRANSITIVE = ("see", "find", "like", "carry", "watch", "chase", "follow", "catch", "want", "bring")
NAMES = {"Tom": "he", "Anna": "she", "Ben": "he", "Lily": "she", "Sam": "he", "Mia": "she", "Jack": "he",
         "Emma": "she", "Leo": "he", "Zoe": "she", "Max": "he", "Ella": "she"}
COUNT_ITEMS = ("apples", "pens", "books", "balls", "cookies", "stickers", "shells", "coins", "flowers", "eggs",
               "cards", "cups")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("garden", "park", "house", "forest", "kitchen", "field")
LIST_WORDS = tuple(sorted(set(ANIMALS) | set(OBJECTS) | set(PLANTS["fruit"]) |
                          {"red", "blue", "green", "yellow", "white", "black", "sun", "moon", "river", "tree"}))

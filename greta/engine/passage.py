"""A passage of plain English (prose, a little code, numbers): the GGUF oracle's text, and the document a chat
prompt carries when no prompt_file is given (greta.engine.tokenize.chat_prompt)."""

PASSAGE = (
    "Paris is the capital and largest city of France. It sits on the river Seine, in the north of the country, "
    "at the heart of the Île-de-France region. The city has been a centre of finance, diplomacy, commerce, "
    "fashion, science and the arts for centuries. Its old town grew around the Île de la Cité, a small island "
    "where the cathedral of Notre-Dame was built between 1163 and 1345. In the nineteenth century, the prefect "
    "Haussmann rebuilt much of the city: wide boulevards, parks, sewers and the cream-coloured stone buildings "
    "that still line its streets. The Eiffel Tower, finished in 1889 for a world fair, was meant to stand for "
    "twenty years; it became the symbol of the city instead. Today the Louvre, once a royal palace, is the most "
    "visited museum in the world, and the metro carries millions of people every day.\n\n"
    "Bread is part of daily life. A baker rises before dawn to mix flour, water, salt and yeast, lets the dough "
    "rest, shapes the loaves and bakes them in a hot oven. The crust should crackle when it cools, and the "
    "crumb should be light, with irregular holes. Many people buy a baguette on the way home and eat the end "
    "of it before they reach the door.\n\n"
    "def mean(values):\n    \"\"\"The arithmetic mean of a non-empty list.\"\"\"\n    return sum(values) / len(values)\n\n"
    "Water boils at 100 degrees Celsius at sea level, and freezes at 0. The speed of light is about 299,792 "
    "kilometres per second. A year has 365 days, or 366 in a leap year, and the Moon goes around the Earth in "
    "about 27 days."
)

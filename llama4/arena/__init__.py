"""The arena: blind side-by-side human preference in the browser, Bradley–Terry ratings, and votes
that leave as FastChat battles or TRL preference pairs for ``llama4 dpo``.

    db.py           the SQLite vote store (schema, versioned)
    ratings.py      Bradley–Terry fit on the Elo scale, bootstrap intervals, win fractions
    contestants.py  a model folder answering on our engine, streamed as text
    battles.py      the blind battle flow and its limits
    app.py          FastAPI routes and the page (static/: index.html, app.js, style.css)
    export.py       battles (FastChat) and preference pairs (TRL)
    auto.py         battles decided by the task verifiers
    cli.py          ``llama4 arena ...``
"""

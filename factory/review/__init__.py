"""``factory review``: review and adjudicate an audit's AI-vs-human disagreements in a local web app.

Modules, lowest first: ``verdicts`` (the four verdicts and their labels), ``maindb`` (every SQL
statement on the factory database), ``workspace`` (the app's own DuckDB file beside it),
``build`` (audit → workspace copy), ``queue`` (filters and paging in SQL), ``session`` (one audit
under review; copying verdicts into the database when it is free), ``security``, ``plots``,
``web`` (Starlette routes and Jinja templates), ``server`` (the command), ``agreement``
(``factory audit adjudicated``).
"""

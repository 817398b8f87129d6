"""The API's request and response bodies, one module per entity.

`base` holds what every entity shares; `bundles`, `devices`, `enroll`,
`rollouts`, `tokens`, `audit` and `health` hold each entity's bodies. Response
bodies are mapped from ORM rows by pydantic (`Model.model_validate(row)`);
a field the row does not hold as such is derived by a validator in the model.
Requests forbid unknown fields and bound every string and collection, so what
reaches the database fits its columns on every backend (no NUL or control
characters, which PostgreSQL text refuses).
"""

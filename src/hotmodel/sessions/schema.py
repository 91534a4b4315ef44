"""The session store's schemas: SQLite's and PostgreSQL's migrations, as plain SQL.

Each backend numbers its own steps: migration N takes a schema from version
N to N+1, in one transaction. SQLite keeps its version in ``PRAGMA
user_version``; PostgreSQL in the one row of table ``schema_version``. Both
hold the same tables (sessions, messages, responses); PostgreSQL starts at
what SQLite reached in five steps, plus each session's ``version`` (new from
one sequence on every append, so another node's cache can tell it changed).
"""

from __future__ import annotations

# SQLite: migration N takes the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        preset      TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE messages (
        session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        role        TEXT NOT NULL,
        message     TEXT NOT NULL,   -- the OpenAI message object, as JSON
        model       TEXT,            -- the model that produced an assistant turn
        created_at  REAL NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE INDEX sessions_by_use ON sessions(updated_at);
    """,
    # 'preset' meant both a model and a system prompt; the system prompt got its own name.
    "ALTER TABLE sessions RENAME COLUMN preset TO system_prompt;",
    # With API keys, a session belongs to the key that created it: ids are per owner
    # (the key's fingerprint; '' without keys), so the key becomes (owner, id).
    """
    CREATE TABLE sessions_v3 (
        owner          TEXT NOT NULL DEFAULT '',
        id             TEXT NOT NULL,
        system_prompt  TEXT NOT NULL DEFAULT '',
        created_at     REAL NOT NULL,
        updated_at     REAL NOT NULL,
        PRIMARY KEY (owner, id)
    );
    INSERT INTO sessions_v3 SELECT '', id, system_prompt, created_at, updated_at FROM sessions;
    CREATE TABLE messages_v3 (
        owner       TEXT NOT NULL DEFAULT '',
        session_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        role        TEXT NOT NULL,
        message     TEXT NOT NULL,
        model       TEXT,
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, session_id, seq),
        FOREIGN KEY (owner, session_id) REFERENCES sessions_v3(owner, id) ON DELETE CASCADE
    );
    INSERT INTO messages_v3
        SELECT '', session_id, seq, role, message, model, created_at FROM messages;
    DROP TABLE messages;
    DROP TABLE sessions;
    ALTER TABLE sessions_v3 RENAME TO sessions;
    ALTER TABLE messages_v3 RENAME TO messages;
    CREATE INDEX sessions_by_use ON sessions(updated_at);
    """,
    # GET /v1/sessions pages through one owner's sessions, most recently used first
    # (ties by id): each page is a range of this index, at any depth.
    "CREATE INDEX sessions_by_owner_use ON sessions(owner, updated_at DESC, id);",
    # OpenAI Responses with `store` (sessions/responses.py): one row per response, chained
    # by `previous_id`; `input` holds only that turn's new input items, `response` the
    # response object as answered.
    """
    CREATE TABLE responses (
        owner        TEXT NOT NULL DEFAULT '',
        id           TEXT NOT NULL,
        previous_id  TEXT,
        model        TEXT NOT NULL DEFAULT '',
        input        TEXT NOT NULL,
        response     TEXT NOT NULL,
        created_at   REAL NOT NULL,
        PRIMARY KEY (owner, id)
    );
    CREATE INDEX responses_by_previous ON responses(owner, previous_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# PostgreSQL: migration N takes the schema from version N to N+1 (table schema_version).
# Ids compare as bytes (COLLATE "C"), as in SQLite: pages and their ties keep one order.
PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE session_versions;
    CREATE TABLE sessions (
        owner          text COLLATE "C" NOT NULL DEFAULT '',
        id             text COLLATE "C" NOT NULL,
        system_prompt  text NOT NULL DEFAULT '',
        created_at     double precision NOT NULL,
        updated_at     double precision NOT NULL,
        version        bigint NOT NULL DEFAULT nextval('session_versions'),
        PRIMARY KEY (owner, id)
    );
    CREATE TABLE messages (
        owner       text COLLATE "C" NOT NULL DEFAULT '',
        session_id  text COLLATE "C" NOT NULL,
        seq         integer NOT NULL,
        role        text NOT NULL,
        message     text NOT NULL,
        model       text,
        created_at  double precision NOT NULL,
        PRIMARY KEY (owner, session_id, seq),
        FOREIGN KEY (owner, session_id) REFERENCES sessions(owner, id) ON DELETE CASCADE
    );
    CREATE INDEX sessions_by_use ON sessions(updated_at);
    CREATE INDEX sessions_by_owner_use ON sessions(owner, updated_at DESC, id);
    CREATE TABLE responses (
        owner        text COLLATE "C" NOT NULL DEFAULT '',
        id           text COLLATE "C" NOT NULL,
        previous_id  text COLLATE "C",
        model        text NOT NULL DEFAULT '',
        input        text NOT NULL,
        response     text NOT NULL,
        created_at   double precision NOT NULL,
        PRIMARY KEY (owner, id)
    );
    CREATE INDEX responses_by_previous ON responses(owner, previous_id);
    """,
)
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)

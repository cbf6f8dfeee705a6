-- Two-factor sign-in for local accounts (issue 19): a TOTP secret per user
-- (RFC 6238) and recovery codes, stored as argon2 hashes and usable once.
-- `last_used_step` keeps a code from working twice.
CREATE TABLE user_totp (
    user_id        bigint      PRIMARY KEY REFERENCES users (id),
    secret         bytea       NOT NULL CHECK (length(secret) >= 16),
    last_used_step bigint,
    enrolled_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_recovery_codes (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id   bigint      NOT NULL REFERENCES users (id),
    code_hash text        NOT NULL,
    used_at   timestamptz
);
CREATE INDEX user_recovery_codes_unused ON user_recovery_codes (user_id) WHERE used_at IS NULL;

-- Single sign-on (issue 19).
--
-- A user created by a sign-in through an OpenID provider is linked to that
-- provider's subject (`sso_provider`, `sso_subject`); its password hash is '!',
-- which no password matches. `role_granted_by` says which mapping gave the role at
-- the last sign-in (shown on the users page).
ALTER TABLE users
    ADD COLUMN sso_provider    text,
    ADD COLUMN sso_subject     text,
    ADD COLUMN role_granted_by text,
    ADD CONSTRAINT sso_identity_whole CHECK ((sso_provider IS NULL) = (sso_subject IS NULL));
CREATE UNIQUE INDEX users_sso_identity ON users (sso_provider, sso_subject) WHERE sso_provider IS NOT NULL;

-- Console-wide settings an admin changes on a page (not in the config file).
-- `password_sign_in`: 'everyone' or 'admins' (password sign-in left only to local
-- admins, the break-glass accounts, once everybody else signs in through a provider).
CREATE TABLE console_settings (
    key        text        PRIMARY KEY,
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO console_settings (key, value) VALUES ('password_sign_in', 'everyone');
ALTER TABLE console_settings ADD CONSTRAINT password_sign_in_value
    CHECK (key <> 'password_sign_in' OR value IN ('everyone', 'admins'));

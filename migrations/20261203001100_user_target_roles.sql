-- Per-target roles (issue 19): a user's role on one target (by name) or on every
-- target of a policy (production, staging, dev), overriding the global role
-- (`users.role`) there, up or down. A grant for a target by name wins over one
-- for its policy. `source` says who set it: an admin on the user's page, or a
-- provider's `[[oidc.target_roles]]` mapping at the last sign-in (re-evaluated at
-- every sign-in); `granted_by` says which admin or which mapping.
CREATE TABLE user_target_roles (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id),
    target     text        CHECK (target <> ''),
    policy     text        CHECK (policy IN ('production', 'staging', 'dev')),
    role       text        NOT NULL CHECK (role IN ('viewer', 'operator', 'approver')),
    source     text        NOT NULL CHECK (source IN ('admin', 'oidc')),
    granted_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT target_or_policy CHECK ((target IS NULL) <> (policy IS NULL))
);
CREATE UNIQUE INDEX user_target_roles_by_target ON user_target_roles (user_id, target) WHERE target IS NOT NULL;
CREATE UNIQUE INDEX user_target_roles_by_policy ON user_target_roles (user_id, policy) WHERE policy IS NOT NULL;

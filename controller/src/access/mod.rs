//! Who may use the API and what they did: named API tokens with roles
//! (`tokens`) and the audit log of every action a token asked for (`audit`).
//! Which role each route needs is the HTTP layer's table
//! (`http::auth::ROUTE_ROLES`); this module only knows tokens and entries.

mod audit;
mod tokens;

pub(crate) use audit::{AUDIT_KEEP, Audit};
pub(crate) use tokens::{Caller, Tokens, TokensError};

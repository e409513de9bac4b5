//! Typed ids: [`NodeId`], [`StepId`] and [`DeploymentId`], so that a node id
//! passed where a step id is expected (or two swapped arguments) is a
//! compile error instead of a lookup that finds nothing.
//!
//! They are dumb on purpose: a string inside, no validation (the controller
//! makes every id itself; an id that arrives from outside, in an API path,
//! is looked up and found or not). Each is `#[serde(transparent)]` and its
//! `Debug` and `Display` are the string's own, so JSON, postcard, the
//! store's bytes and every log line read exactly as they did when the ids
//! were plain `String`s (the tests below pin that).

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, without copying it.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Hashes and compares as its text, so a map keyed by the id can
        /// be looked up with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id! {
    /// An enrolled node (`n-` and 16 hex digits), as its certificate names it.
    NodeId
}

string_id! {
    /// A step in a node's queue (`s-` and 16 hex digits).
    StepId
}

string_id! {
    /// A deployment (`d-` and 12 hex digits).
    DeploymentId
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Typed {
        node: NodeId,
        step: Option<StepId>,
        deployment: DeploymentId,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        node: String,
        step: Option<String>,
        deployment: String,
    }

    fn both() -> (Typed, Plain) {
        (
            Typed {
                node: "n-0123456789abcdef".into(),
                step: Some("s-fedcba9876543210".into()),
                deployment: "d-0a1b2c3d4e5f".into(),
            },
            Plain {
                node: "n-0123456789abcdef".into(),
                step: Some("s-fedcba9876543210".into()),
                deployment: "d-0a1b2c3d4e5f".into(),
            },
        )
    }

    #[test]
    fn ids_are_the_same_json_and_postcard_bytes_as_strings() {
        let (typed, plain) = both();
        let json = serde_json::to_string(&typed).expect("json");
        assert_eq!(json, serde_json::to_string(&plain).expect("json"));
        assert_eq!(
            json,
            r#"{"node":"n-0123456789abcdef","step":"s-fedcba9876543210","deployment":"d-0a1b2c3d4e5f"}"#
        );
        assert_eq!(
            serde_json::from_str::<Typed>(&json).expect("reads back"),
            typed
        );
        let bytes = postcard::to_stdvec(&typed).expect("postcard");
        assert_eq!(bytes, postcard::to_stdvec(&plain).expect("postcard"));
        assert_eq!(
            postcard::from_bytes::<Typed>(&bytes).expect("reads back"),
            typed
        );
    }

    #[test]
    fn ids_print_as_their_text() {
        let (typed, plain) = both();
        assert_eq!(
            format!("{typed:?}").replace("Typed", "Plain"),
            format!("{plain:?}")
        );
        assert_eq!(typed.node.to_string(), "n-0123456789abcdef");
        assert_eq!(typed.node.as_str(), "n-0123456789abcdef");
        assert_eq!(String::from(typed.deployment), "d-0a1b2c3d4e5f");
    }

    #[test]
    fn a_map_keyed_by_ids_is_looked_up_by_text() {
        let mut m: HashMap<StepId, u32> = HashMap::new();
        m.insert(StepId::from("s-1"), 1);
        assert_eq!(m.get("s-1"), Some(&1));
        assert_eq!(m.get("s-2"), None);
        let id = StepId::from("s-1");
        assert!(id == "s-1" && id != "s-2");
    }
}

//! banger-error: the one way banger writes an error for a person.
//!
//! Error types carry their causes (`#[source]`, `#[from]`) instead of formatting them into
//! their message; where an error reaches a person (an RPC error's message, a log line, the
//! CLI, the helper's answer) [`error_chain`] writes it out with every cause.

use std::error::Error;

/// `err: cause: cause…`: `err` and each of its [`Error::source`]s, `: `-separated.
pub fn error_chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn every_cause_follows_its_error() {
        let e = Layer(
            "download failed",
            Some(Box::new(Layer(
                "connection reset",
                Some(Box::new(Layer("os error 104", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "download failed: connection reset: os error 104"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}

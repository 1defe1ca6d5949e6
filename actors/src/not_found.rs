//! A name the user gave that names nothing: one error type for every kind of name (VM,
//! image, kernel), one message shape, `no <kind> named <name>; see \`banger <kind> list\``,
//! whoever finds it missing (the VM supervisor checking a create, or the RPC layer
//! answering `image show`). It maps to the `NOT_FOUND` code, so the CLI exits 4.
//! (Names missing from a *catalog* are the pull's own error: they list what is available.)

use std::fmt;

/// The kinds of names a user gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vm,
    Image,
    Kernel,
    /// A warm snapshot (`image warm`), by id or image name.
    Warm,
}

impl Kind {
    /// The word used in messages and in the command that lists them (`banger vm list`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Image => "image",
            Kind::Kernel => "kernel",
            Kind::Warm => "warm snapshot",
        }
    }

    /// The command that lists them.
    pub fn list_command(self) -> &'static str {
        match self {
            Kind::Vm => "vm list",
            Kind::Image => "image list",
            Kind::Kernel => "kernel list",
            Kind::Warm => "image warm list",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `no image named nope; see \`banger image list\``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {kind} named {}; see `banger {}`", shown(name), kind.list_command())]
pub struct NotFound {
    pub kind: Kind,
    pub name: String,
}

impl NotFound {
    pub fn vm(name: impl Into<String>) -> NotFound {
        NotFound {
            kind: Kind::Vm,
            name: name.into(),
        }
    }

    pub fn warm(name: impl Into<String>) -> NotFound {
        NotFound {
            kind: Kind::Warm,
            name: name.into(),
        }
    }

    pub fn image(name: impl Into<String>) -> NotFound {
        NotFound {
            kind: Kind::Image,
            name: name.into(),
        }
    }

    pub fn kernel(name: impl Into<String>) -> NotFound {
        NotFound {
            kind: Kind::Kernel,
            name: name.into(),
        }
    }
}

/// A name as typed, quoted only when it would not read as one (empty, or with spaces).
fn shown(name: &str) -> String {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        format!("{name:?}")
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shape_for_every_kind() {
        assert_eq!(
            NotFound::vm("nope").to_string(),
            "no vm named nope; see `banger vm list`"
        );
        assert_eq!(
            NotFound::image("nope").to_string(),
            "no image named nope; see `banger image list`"
        );
        assert_eq!(
            NotFound::kernel("nope").to_string(),
            "no kernel named nope; see `banger kernel list`"
        );
        assert_eq!(
            NotFound::image("").to_string(),
            "no image named \"\"; see `banger image list`"
        );
    }
}

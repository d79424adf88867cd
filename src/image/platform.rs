//! Platforms (`os/arch[/variant]`) and how a manifest is matched against one.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in OCI's names.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Self {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self {
                    os: os.to_string(),
                    arch: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(format!(
                "invalid platform {s:?}: expected OS/ARCH[/VARIANT]"
            )),
        }
    }

    fn normalized_variant(&self) -> Option<&str> {
        match (self.arch.as_str(), self.variant.as_deref()) {
            ("arm64", Some("v8")) | ("arm64", None) => None,
            ("amd64", Some("v1")) => None,
            (_, v) => v,
        }
    }

    /// Whether an image for `other` runs here: same os and arch; a variant only has to match
    /// when this platform names one.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.arch != other.arch {
            return false;
        }
        match (self.normalized_variant(), other.normalized_variant()) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let p = Platform::parse("linux/arm64").unwrap();
        assert!(p.matches(&Platform::parse("linux/arm64/v8").unwrap()));
        assert!(!p.matches(&Platform::parse("linux/amd64").unwrap()));
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(!v7.matches(&Platform::parse("linux/arm/v6").unwrap()));
        assert!(Platform::parse("linux").is_err());
    }
}

//! A minimal JSON object writer for `--json` output (one object per line), so xtask needs no
//! serialization dependency.

use std::fmt::Write as _;

/// A JSON object being written, keys in insertion order.
#[derive(Debug)]
pub struct Object {
    buf: String,
}

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Object { buf: String::from("{") }
    }

    fn key(mut self, k: &str) -> Self {
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        write_str(&mut self.buf, k);
        self.buf.push(':');
        self
    }

    /// Adds a string member.
    pub fn str(self, k: &str, v: &str) -> Self {
        let mut o = self.key(k);
        write_str(&mut o.buf, v);
        o
    }

    /// Adds a number member; NaN and infinities become `null`.
    pub fn num(self, k: &str, v: f64) -> Self {
        let mut o = self.key(k);
        if v.is_finite() {
            let _ = write!(o.buf, "{v:e}");
        } else {
            o.buf.push_str("null");
        }
        o
    }

    /// Adds an integer member.
    pub fn int(self, k: &str, v: u64) -> Self {
        let mut o = self.key(k);
        let _ = write!(o.buf, "{v}");
        o
    }

    /// Adds a boolean member.
    pub fn bool(self, k: &str, v: bool) -> Self {
        let mut o = self.key(k);
        o.buf.push_str(if v { "true" } else { "false" });
        o
    }

    /// Adds a nested object.
    pub fn obj(self, k: &str, v: Object) -> Self {
        let mut o = self.key(k);
        o.buf.push_str(&v.finish());
        o
    }

    /// The object's text.
    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// Writes `s` as a JSON string literal.
fn write_str(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => buf.push(c),
        }
    }
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_nests() {
        let inner = Object::new().int("n", 3);
        let s = Object::new()
            .str("reason", "a `b`\n  - \"c\"\\\u{1}")
            .num("err", 1.25e-3)
            .num("nan", f64::NAN)
            .bool("ok", false)
            .obj("inner", inner)
            .finish();
        assert_eq!(
            s,
            r#"{"reason":"a `b`\n  - \"c\"\\\u0001","err":1.25e-3,"nan":null,"ok":false,"inner":{"n":3}}"#
        );
    }
}

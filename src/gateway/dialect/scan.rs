//! One pass over an event's (or a whole answer's) JSON: whether it is JSON at all (exactly what
//! `serde_json::from_slice::<IgnoredAny>` accepts, which is what "malformed" meant before this
//! pass existed), where the values of the top-level keys a relay reads are, and where the string
//! values of any key are. A stream's events were each read three or four times (a JSON check, a
//! search for `"usage"`, one for `"error"`, one for `"content"`); this reads them once. A whole
//! answer passed as it came is checked the same way, and only its `usage` and `error` parsed.
//!
//! What serde_json accepts, and so this: whitespace is space, tab, line feed and carriage
//! return; numbers are `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`; strings refuse
//! raw control characters and escapes other than `\" \\ \/ \b \f \n \r \t \uXXXX` (any four hex
//! digits: an unpaired surrogate is not refused when the value is skipped, nor is invalid
//! UTF-8); no trailing commas; nothing but whitespace after the value. serde_json skips a value
//! nested to any depth; this stops at [`MAX_DEPTH`] ([`Bad::Deep`]), for its caller to judge
//! such a text the old way.

/// Arrays and objects nested deeper than this are not scanned (see [`Bad::Deep`]).
pub const MAX_DEPTH: u32 = 128;

/// Why [`scan`] found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not JSON.
    Invalid,
    /// Nested deeper than [`MAX_DEPTH`] before the scan could tell: not looked at further.
    Deep,
}

/// Where a value is in the text: `json[start..end]`, as written.
pub type Span = (usize, usize);

/// What [`scan`] found in a valid JSON text: where the values of the top-level keys a relay
/// reads are (the last, where a key is written twice, as a parser keeps the last).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub usage: Option<Span>,
    pub error: Option<Span>,
    pub choices: Option<Span>,
    pub data: Option<Span>,
}

/// Checks that `json` is one JSON value and reports each object key whose value is a string to
/// `on_string(key, start, end)` (the key as written between its quotes, and the string's inside
/// as `json[start..end]`, escapes unresolved), at any depth.
pub fn scan(json: &[u8], on_string: &mut dyn FnMut(&[u8], usize, usize)) -> Result<Found, Bad> {
    let mut s = Scanner {
        b: json,
        i: 0,
        depth: 0,
        deep: false,
        found: Found::default(),
        on_string,
    };
    s.ws();
    let whole = s.value(true).is_some() && {
        s.ws();
        s.i == json.len()
    };
    match (whole, s.deep) {
        (true, _) => Ok(s.found),
        (false, true) => Err(Bad::Deep),
        (false, false) => Err(Bad::Invalid),
    }
}

struct Scanner<'a, 'f> {
    b: &'a [u8],
    i: usize,
    depth: u32,
    deep: bool,
    found: Found,
    on_string: &'f mut dyn FnMut(&[u8], usize, usize),
}

impl Scanner<'_, '_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// One value; `top`: the text's own value (its keys are the top-level ones).
    fn value(&mut self, top: bool) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(top),
            b'[' => self.array(),
            b'"' => {
                self.i += 1;
                self.string().map(|_| ())
            }
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            _ => None,
        }
    }

    fn word(&mut self, w: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(w) {
            self.i += w.len();
            Some(())
        } else {
            None
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// A string's inside, from after its opening quote; returns where it starts and ends, and
    /// leaves `i` after its closing quote.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        loop {
            self.skip_plain();
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i - 1));
                }
                b'\\' => {
                    self.i += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.b.get(self.i + 1..self.i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                // A raw control character.
                _ => return None,
            }
        }
    }

    /// Skips the bytes of a string that need nothing (not a quote, a backslash or a control
    /// character), eight at a time where it can.
    fn skip_plain(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let v = u64::from_le_bytes(word);
            let quote = v ^ (ONES * u64::from(b'"'));
            let slash = v ^ (ONES * u64::from(b'\\'));
            // A byte is flagged when it is zero (for the two XORs) or below 0x20; bytes of 0x80
            // and above never are.
            let special = ((quote.wrapping_sub(ONES) & !quote)
                | (slash.wrapping_sub(ONES) & !slash)
                | (v.wrapping_sub(ONES * 0x20) & !v))
                & HIGH;
            if special != 0 {
                self.i += (special.trailing_zeros() / 8) as usize;
                return;
            }
            self.i += 8;
        }
        while let Some(c) = self.peek() {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return;
            }
            self.i += 1;
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.deep = true;
            return None;
        }
        Some(())
    }

    /// After an array's or object's opening bracket: whether it closes at once.
    fn opened(&mut self, close: u8) -> Option<bool> {
        self.enter()?;
        self.i += 1;
        self.ws();
        Some(self.closes(close))
    }

    /// Takes `close` if it is next (leaving the array or object).
    fn closes(&mut self, close: u8) -> bool {
        if self.peek() == Some(close) {
            self.i += 1;
            self.depth -= 1;
            return true;
        }
        false
    }

    /// After an item: a comma (another item follows, `Some(false)`) or `close` (`Some(true)`).
    fn after_item(&mut self, close: u8) -> Option<bool> {
        self.ws();
        if self.peek()? == b',' {
            self.i += 1;
            self.ws();
            return Some(false);
        }
        self.closes(close).then_some(true)
    }

    fn array(&mut self) -> Option<()> {
        if self.opened(b']')? {
            return Some(());
        }
        loop {
            self.value(false)?;
            if self.after_item(b']')? {
                return Some(());
            }
        }
    }

    fn object(&mut self, top: bool) -> Option<()> {
        if self.opened(b'}')? {
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            self.i += 1;
            let (ks, ke) = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            let start = self.i;
            if self.peek()? == b'"' {
                self.i += 1;
                let (vs, ve) = self.string()?;
                (self.on_string)(&self.b[ks..ke], vs, ve);
            } else {
                self.value(false)?;
            }
            if top {
                let at = Some((start, self.i));
                match &self.b[ks..ke] {
                    b"usage" => self.found.usage = at,
                    b"error" => self.found.error = at,
                    b"choices" => self.found.choices = at,
                    b"data" => self.found.data = at,
                    _ => {}
                }
            }
            if self.after_item(b'}')? {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_says(json: &[u8]) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok()
    }

    fn valid(json: &[u8]) -> bool {
        scan(json, &mut |_, _, _| {}).is_ok()
    }

    const SAMPLES: &[&str] = &[
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"budget","choices":[{"index":0,"delta":{"role":"assistant","content":"He said \"hi\"\n caf\u00e9"},"finish_reason":null}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":20,"total_tokens":32,"prompt_tokens_details":{"cached_tokens":0}}}"#,
        r#"{"error":{"message":"overloaded","type":"api_error","code":null}}"#,
        r#"{"a":[1,-2,3.5,-0.25e10,6E-3,0,true,false,null,{},[],[[]],{"b":{"c":"d"}}],"e":"\\\/\b\f\r\t\u12aB"}"#,
        r#"  [ 1 , { "x" : "y" } ]  "#,
        "\"just a string\"",
        "-0",
        "123",
        "null",
    ];

    #[test]
    fn accepts_exactly_what_serde_json_accepts() {
        let mut cases: Vec<Vec<u8>> = SAMPLES.iter().map(|s| s.as_bytes().to_vec()).collect();
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{\"a\" 1}",
            "{1:2}",
            "01",
            "-",
            "1.",
            "1e",
            "1e+",
            ".5",
            "+1",
            "tru",
            "nul",
            "\"a",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"a\u{1}b\"",
            "[1 2]",
            "{} {}",
            "[]]",
            "\"\\u123\"",
            "\u{c}1",
            "1\u{c}",
        ] {
            cases.push(bad.as_bytes().to_vec());
        }
        cases.push(format!("{}1{}", "[".repeat(128), "]".repeat(128)).into_bytes());
        cases.push(format!("{}1{}", "{\"a\":".repeat(128), "}".repeat(128)).into_bytes());
        // Every sample cut at every byte, and with bytes changed and dropped here and there.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"{}[]\",:\\ \t\n0123456789.-+eEtrufalsn/bu\x01\x1f\xc3\xa9xA";
        for s in SAMPLES {
            let s = s.as_bytes();
            for cut in 0..s.len() {
                cases.push(s[..cut].to_vec());
            }
            for _ in 0..3000 {
                let mut m = s.to_vec();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % m.len() as u64) as usize;
                    match next() % 3 {
                        0 => m[at] = alphabet[(next() % alphabet.len() as u64) as usize],
                        1 => {
                            m.remove(at);
                        }
                        _ => m.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
                    }
                    if m.is_empty() {
                        break;
                    }
                }
                cases.push(m);
            }
        }
        let mut differ = Vec::new();
        for c in &cases {
            if valid(c) != serde_says(c) {
                differ.push(String::from_utf8_lossy(c).into_owned());
            }
        }
        assert!(
            differ.is_empty(),
            "{} differ, first: {:?}",
            differ.len(),
            &differ[..differ.len().min(5)]
        );
        let accepted = cases.iter().filter(|c| valid(c)).count();
        assert!(
            accepted > 1000 && accepted < cases.len() - 1000,
            "{accepted} of {}",
            cases.len()
        );
    }

    #[test]
    fn deeper_than_it_scans_is_told_apart_from_invalid() {
        let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(scan(deep.as_bytes(), &mut |_, _, _| {}), Err(Bad::Deep));
        let deep_and_bad = format!("{}1{}", "[".repeat(129), "]".repeat(128));
        assert_eq!(
            scan(deep_and_bad.as_bytes(), &mut |_, _, _| {}),
            Err(Bad::Deep)
        );
        assert_eq!(scan(b"[1,]", &mut |_, _, _| {}), Err(Bad::Invalid));
    }

    #[test]
    fn reports_top_level_keys_and_string_values_of_keys() {
        let json = br#"{"model":"m-1","choices":[{"delta":{"content":"a\"b"}}],"usage":null,"x":{"error":1},"content":7}"#;
        let mut seen = Vec::new();
        let found = scan(json, &mut |k, s, e| {
            seen.push((
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(&json[s..e]).into_owned(),
            ))
        });
        let at = |part: &str| {
            let start = memchr::memmem::find(json, part.as_bytes()).expect("in the text");
            Some((start, start + part.len()))
        };
        assert_eq!(
            found,
            Ok(Found {
                usage: at("null"),
                error: None,
                choices: at(r#"[{"delta":{"content":"a\"b"}}]"#),
                data: None,
            })
        );
        assert_eq!(
            seen,
            [
                ("model".to_owned(), "m-1".to_owned()),
                ("content".to_owned(), "a\\\"b".to_owned())
            ]
        );
    }
}

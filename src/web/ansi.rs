//! ANSI colours in log lines: SGR sequences (`ESC [ … m`) become styled
//! spans; every other control sequence stays visible as `\x1b…`, so a
//! log can neither hide text nor move the cursor on the page. Pure.

use maud::{html, Markup};

/// The style SGR sequences have set so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sgr {
    /// Foreground and background: 0–7, 8–15 bright; none: the default.
    pub fg: Option<u8>,
    pub bg: Option<u8>,
    pub bold: bool,
    pub dim: bool,
    pub italic: bool,
    pub underline: bool,
}

impl Sgr {
    /// Applies the parameters of one SGR sequence (`1;31`); 256-colour
    /// and true-colour forms are read and dropped (the default colour).
    fn apply(&mut self, params: &str) {
        let mut it = params.split(';').map(|p| p.parse::<u16>().unwrap_or(0));
        if params.is_empty() {
            *self = Sgr::default();
            return;
        }
        while let Some(p) = it.next() {
            match p {
                0 => *self = Sgr::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some((p - 30) as u8),
                39 => self.fg = None,
                40..=47 => self.bg = Some((p - 40) as u8),
                49 => self.bg = None,
                90..=97 => self.fg = Some((p - 90 + 8) as u8),
                100..=107 => self.bg = Some((p - 100 + 8) as u8),
                38 | 48 => {
                    match it.next() {
                        Some(5) => {
                            it.next();
                        }
                        Some(2) => {
                            it.next();
                            it.next();
                            it.next();
                        }
                        _ => {}
                    }
                    if p == 38 {
                        self.fg = None
                    } else {
                        self.bg = None
                    }
                }
                _ => {}
            }
        }
    }

    /// Its CSS classes (`a-f1 a-b` …); empty for the default style.
    pub fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(f) = self.fg {
            c.push(format!("a-f{f}"));
        }
        if let Some(b) = self.bg {
            c.push(format!("a-b{b}"));
        }
        for (on, name) in [
            (self.bold, "a-bold"),
            (self.dim, "a-dim"),
            (self.italic, "a-it"),
            (self.underline, "a-ul"),
        ] {
            if on {
                c.push(name.to_string());
            }
        }
        c.join(" ")
    }
}

/// A line cut into runs of one style (the escape sequences taken out).
pub fn runs(line: &str, mut style: Sgr) -> (Vec<(Sgr, &str)>, Sgr) {
    let mut out = Vec::new();
    let mut plain_from = 0usize;
    let mut i = 0usize;
    let bytes = line.as_bytes();
    while let Some(j) = memchr::memchr(0x1b, &bytes[i..]) {
        let at = i + j;
        // ESC [ digits and semicolons m: an SGR sequence.
        let tail = &line[at + 1..];
        let sgr = tail.strip_prefix('[').and_then(|t| {
            let end = t.find(|c: char| !(c.is_ascii_digit() || c == ';'))?;
            (t.as_bytes()[end] == b'm' && end <= 64).then(|| &t[..end])
        });
        match sgr {
            Some(params) => {
                if at > plain_from {
                    out.push((style, &line[plain_from..at]));
                }
                style.apply(params);
                i = at + 2 + params.len() + 1;
                plain_from = i;
            }
            None => i = at + 1,
        }
    }
    if plain_from < line.len() {
        out.push((style, &line[plain_from..]));
    }
    (out, style)
}

/// A line as HTML: coloured runs, control characters made visible,
/// `mark` (a search text) highlighted. Returns the style it leaves for
/// the next line (a colour may span lines).
pub fn render(line: &str, style: Sgr, mark: Option<&str>) -> (Markup, Sgr) {
    let (runs, after) = runs(line, style);
    let markup = html! {
        @for (s, text) in &runs {
            @let classes = s.classes();
            @if classes.is_empty() {
                (marked(text, mark))
            } @else {
                span class=(classes) { (marked(text, mark)) }
            }
        }
    };
    (markup, after)
}

fn marked(text: &str, mark: Option<&str>) -> Markup {
    let visible = super::pages::visible(text);
    let Some(m) = mark
        .map(|m| super::pages::visible(m).into_owned())
        .filter(|m| !m.is_empty())
    else {
        return html! { (visible) };
    };
    let parts: Vec<&str> = visible.split(m.as_str()).collect();
    html! {
        @for (k, part) in parts.iter().enumerate() {
            @if k > 0 { mark { (m) } }
            (part)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgr_colours_become_runs_and_other_sequences_stay_visible() {
        let (r, after) = runs(
            "a\x1b[1;31mred\x1b[0m b \x1b[2Kc \x1b[32mgreen",
            Sgr::default(),
        );
        let texts: Vec<(&str, String)> = r.iter().map(|(s, t)| (*t, s.classes())).collect();
        assert_eq!(
            texts,
            vec![
                ("a", String::new()),
                ("red", "a-f1 a-bold".into()),
                (" b \x1b[2Kc ", String::new()),
                ("green", "a-f2".into())
            ]
        );
        assert_eq!(after.fg, Some(2), "the colour goes on to the next line");
        let html = render(" b \x1b[2Kc", Sgr::default(), None).0.into_string();
        assert!(html.contains("\\x1b[2Kc"), "{html}");
        let html = render("x \x1b[91mFAIL\x1b[m <b>", Sgr::default(), Some("FAIL"))
            .0
            .into_string();
        assert_eq!(
            html,
            "x <span class=\"a-f9\"><mark>FAIL</mark></span> &lt;b&gt;"
        );
        // 256 colours and true colour are read and dropped.
        let (r, _) = runs("\x1b[38;5;196mx\x1b[48;2;1;2;3my", Sgr::default());
        assert!(r.iter().all(|(s, _)| s.classes().is_empty()), "{r:?}");
    }
}

//! Weighted captions (sd-scripts' `weighted_captions`): A1111's attention syntax read out of a
//! caption as (text, weight) pieces, as sd-scripts' `parse_prompt_attention` does.
//!
//! `(text)` multiplies by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3; brackets nest and
//! multiply; `\(` `\)` `\[` `\]` `\\` are the literal characters; an unclosed bracket applies to
//! the end; neighbouring pieces of equal weight merge. The text encoder's output state of each
//! token is then multiplied by its piece's weight (see
//! [`crate::models::tokenizer::ClipTokenizer::encode_weighted_chunks`]).

/// One lexeme of sd-scripts' `_re_attention`, in its order of alternatives.
enum Lexeme<'a> {
    /// `\(` `\)` `\[` `\]` `\\` or a lone `\`: the text after the backslash.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:1.3)`, the weight text and the whole lexeme.
    Weight(&'a str, &'a str),
    CloseRound,
    CloseSquare,
    /// A run of characters that are none of `\ ( ) [ ] :`, or a lone `:`.
    Text(&'a str),
}

fn is_special(c: char) -> bool {
    matches!(c, '\\' | '(' | ')' | '[' | ']' | ':')
}

/// The next lexeme at the start of `s` and its length in bytes.
fn next_lexeme(s: &str) -> (Lexeme<'_>, usize) {
    let mut chars = s.chars();
    let first = chars.next().expect("not empty");
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => (Lexeme::Escaped(&s[1..1 + c.len_utf8()]), 1 + c.len_utf8()),
            _ => (Lexeme::Escaped(""), 1),
        },
        '(' => (Lexeme::OpenRound, 1),
        '[' => (Lexeme::OpenSquare, 1),
        ':' => {
            // `:([+-]?[.\d]+)\)`
            let rest = &s[1..];
            let sign = usize::from(rest.starts_with(['+', '-']));
            let digits = rest[sign..].bytes().take_while(|b| *b == b'.' || b.is_ascii_digit()).count();
            if digits > 0 && rest[sign + digits..].starts_with(')') {
                let len = 1 + sign + digits + 1;
                (Lexeme::Weight(&rest[..sign + digits], &s[..len]), len)
            } else {
                (Lexeme::Text(":"), 1)
            }
        }
        ')' => (Lexeme::CloseRound, 1),
        ']' => (Lexeme::CloseSquare, 1),
        _ => {
            let len = s.find(is_special).unwrap_or(s.len());
            (Lexeme::Text(&s[..len]), len)
        }
    }
}

/// sd-scripts' `parse_prompt_attention`: the caption as (text, weight) pieces.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f64)> {
    const ROUND: f64 = 1.1;
    let mut res: Vec<(String, f64)> = vec![];
    let mut round: Vec<usize> = vec![];
    let mut square: Vec<usize> = vec![];
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| res[from..].iter_mut().for_each(|p| p.1 *= by);
    let mut rest = text;
    while !rest.is_empty() {
        let (lexeme, len) = next_lexeme(rest);
        match lexeme {
            Lexeme::Escaped(t) => res.push((t.to_string(), 1.0)),
            Lexeme::OpenRound => round.push(res.len()),
            Lexeme::OpenSquare => square.push(res.len()),
            // A weight Python's float() cannot read ("1.2.3") would stop sd-scripts; here it
            // stays text.
            Lexeme::Weight(w, whole) => match (w.parse::<f64>(), round.last()) {
                (Ok(w), Some(_)) => {
                    let from = round.pop().expect("not empty");
                    multiply(&mut res, from, w);
                }
                _ => res.push((whole.to_string(), 1.0)),
            },
            Lexeme::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("not empty");
                multiply(&mut res, from, ROUND);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("not empty");
                multiply(&mut res, from, 1.0 / ROUND);
            }
            Lexeme::CloseRound => res.push((")".into(), 1.0)),
            Lexeme::CloseSquare => res.push(("]".into(), 1.0)),
            Lexeme::Text(t) => res.push((t.to_string(), 1.0)),
        }
        rest = &rest[len..];
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / ROUND);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Merge runs of identical weights.
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0 += &next.0;
        } else {
            i += 1;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text)
    }

    #[test]
    fn reads_sd_scripts_docstring_examples() {
        // The examples of sd-scripts' parse_prompt_attention docstring.
        assert_eq!(pieces("normal text"), [("normal text".to_string(), 1.0)]);
        assert_eq!(pieces("an (important) word"), [("an ".into(), 1.0), ("important".into(), 1.1), (" word".into(), 1.0)]);
        assert_eq!(pieces("(unbalanced"), [("unbalanced".to_string(), 1.1)]);
        assert_eq!(pieces("\\(literal\\]"), [("(literal]".to_string(), 1.0)]);
        assert_eq!(pieces("(unnecessary)(parens)"), [("unnecessaryparens".to_string(), 1.1)]);
        let got = pieces("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let expected = [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ];
        assert_eq!(got.len(), expected.len(), "{got:?}");
        for ((t, w), (et, ew)) in got.iter().zip(expected) {
            assert_eq!(t, et);
            assert_eq!(*w, ew, "{t}");
        }
    }
}

//! Every statement the crate sends resolves its names without a search path another role
//! could write (CVE-2018-1058's lesson; docs/security.md, "Names the SQL resolves").
//!
//! PostgreSQL picks a function or operator with an exact argument-type match in *any*
//! schema on the path over a polymorphic or coercible one in `pg_catalog`, so a role that
//! may create in `public` (or in a schema named like the connecting role) can plant
//! `public.unnest(text[])` or `public.=(oid, regclass)` and have our statements run it with
//! our privileges. The crate's SQL is therefore written fully qualified:
//! `pg_catalog.unnest`, `OPERATOR(pg_catalog.=)`, `::pg_catalog.text`,
//! `pg_catalog.pg_class`, `updatepipe.log`. This test reads the sources (every string
//! literal under `src/` that is a statement, outside unit tests) and the migrations, and
//! fails on a name that is not qualified. It needs no server; `tests/hostile.rs` plants the
//! objects for real.

use std::path::{Path, PathBuf};

/// Keywords that may stand before `(` without being a function call.
const KEYWORDS_BEFORE_PAREN: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "by",
    "check",
    "coalesce",
    "conflict",
    "default",
    "else",
    "exists",
    "filter",
    "from",
    "greatest",
    "insert",
    "join",
    "key",
    "lateral",
    "least",
    "materialized",
    "not",
    "on",
    "operator",
    "or",
    "over",
    "returns",
    "row",
    "select",
    "table",
    "then",
    "union",
    "using",
    "values",
    "when",
    "where",
    "with",
];

/// Constructs that compare with an `=` (or another operator) found through the search path.
const IMPLICIT_OPERATORS: &[&str] = &[
    "in", "between", "like", "ilike", "similar", "nullif", "overlaps",
];

/// Constructs left out: `CAST (x AS type)` (write `x::pg_catalog.type`), `EXTRACT`
/// (write `pg_catalog.date_part`), so that `FROM` always names a relation.
const BANNED: &[&str] = &["cast", "extract"];

/// Schemas a qualified name may name: no other role can create objects in them (`pg_temp`
/// is the session's own).
const TRUSTED_SCHEMAS: &[&str] = &["pg_catalog", "updatepipe", "pg_temp"];

/// Words that end a `FROM` list.
const END_OF_FROM: &[&str] = &[
    "where",
    "group",
    "order",
    "limit",
    "join",
    "cross",
    "left",
    "right",
    "inner",
    "full",
    "on",
    "union",
    "returning",
    "having",
    "window",
    "offset",
    "for",
    "with",
];

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    /// A quoted identifier, a `{placeholder}` of a format string, or a `$n` parameter.
    Name,
    Number,
    Text,
    Op(String),
    Punct(char),
}

/// The SQL text of one literal as tokens (comments, string literals and dollar quotes are
/// single tokens or gone).
fn tokenize(sql: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            let end = find(&chars, i + 2, &['*', '/']).ok_or("an unclosed comment")?;
            i = end + 2;
        } else if c == '\'' {
            // '' inside is a quote.
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("an unclosed string literal".into()),
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                    Some('\'') => break,
                    Some(_) => i += 1,
                }
            }
            i += 1;
            tokens.push(Token::Text);
        } else if c == '"' {
            let end = chars[i + 1..]
                .iter()
                .position(|&d| d == '"')
                .ok_or("an unclosed quoted identifier")?;
            i += end + 2;
            tokens.push(Token::Name);
        } else if c == '{' {
            let end = chars[i..]
                .iter()
                .position(|&d| d == '}')
                .ok_or("an unclosed placeholder")?;
            i += end + 1;
            tokens.push(Token::Name);
        } else if c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            if chars.get(i) == Some(&'$') {
                // A dollar quote: its body is text.
                let tag: Vec<char> = chars[start..=i].to_vec();
                let end = find(&chars, i + 1, &tag).ok_or("an unclosed dollar quote")?;
                i = end + tag.len();
                tokens.push(Token::Text);
            } else {
                tokens.push(Token::Name);
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            tokens.push(Token::Word(
                chars[start..i].iter().collect::<String>().to_lowercase(),
            ));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            tokens.push(Token::Number);
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(Token::Op("::".into()));
            i += 2;
        } else if "+-*/<>=~!@#%^&|`?".contains(c) {
            let start = i;
            while i < chars.len() && "+-*/<>=~!@#%^&|`?".contains(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Op(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    Ok(tokens)
}

fn find(chars: &[char], from: usize, needle: &[char]) -> Option<usize> {
    (from..chars.len()).find(|&at| chars[at..].starts_with(needle))
}

fn word(token: Option<&Token>) -> Option<&str> {
    match token {
        Some(Token::Word(w)) => Some(w),
        _ => None,
    }
}

/// The names one statement resolves through the search path; empty when all are
/// qualified.
fn unqualified(sql: &str) -> Vec<String> {
    let tokens = match tokenize(sql) {
        Ok(tokens) => tokens,
        Err(e) => return vec![e],
    };
    let mut found = Vec::new();
    // Names defined in the statement: common table expressions and aliases.
    let mut local: Vec<String> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if let Token::Word(name) = t
            && word(tokens.get(i + 1)) == Some("as")
            && matches!(
                (tokens.get(i + 2), word(tokens.get(i + 2))),
                (Some(Token::Punct('(')), _) | (_, Some("materialized" | "not"))
            )
        {
            local.push(name.clone());
        }
    }
    let is_qualified = |i: usize| matches!(tokens.get(i + 1), Some(Token::Punct('.')));
    let is_trusted_schema = |i: usize| {
        matches!(word(tokens.get(i)), Some(schema) if TRUSTED_SCHEMAS.contains(&schema))
            || matches!(tokens.get(i), Some(Token::Name))
    };
    // The last clause keyword at each depth of parentheses, and whether an UPDATE's or a
    // SET statement's assignments are being read.
    let mut in_from = vec![false];
    let mut in_set = vec![false];
    let mut i = 0;
    while i < tokens.len() {
        let before = if i > 0 { tokens.get(i - 1) } else { None };
        match &tokens[i] {
            Token::Punct('(') => {
                in_from.push(false);
                in_set.push(false);
            }
            Token::Punct(')') => {
                in_from.pop();
                in_set.pop();
                if in_from.is_empty() {
                    return vec!["unbalanced parentheses".into()];
                }
            }
            Token::Punct(';') => {
                *in_from.last_mut().unwrap() = false;
                *in_set.last_mut().unwrap() = false;
            }
            Token::Word(w) => {
                let w = w.as_str();
                let after_dot = matches!(before, Some(Token::Punct('.')));
                if BANNED.contains(&w) && !after_dot {
                    found.push(format!("{w}(...)"));
                }
                if IMPLICIT_OPERATORS.contains(&w) && !after_dot {
                    found.push(format!("{w} (an implicit operator)"));
                }
                // IS [NOT] DISTINCT FROM compares with `=`; SELECT DISTINCT with the type's
                // default operator class, found without the path.
                if w == "distinct" && matches!(word(before), Some("is" | "not")) {
                    found.push("is distinct from (an implicit operator)".into());
                }
                if w == "case" && word(tokens.get(i + 1)) != Some("when") {
                    found.push("CASE x WHEN (an implicit =)".into());
                }
                if w == "set" {
                    *in_set.last_mut().unwrap() = true;
                }
                if ["where", "from", "returning"].contains(&w) {
                    *in_set.last_mut().unwrap() = false;
                }
                if w == "into" || w == "table" {
                    check_relation(&tokens, i + 1, &local, true, &mut found);
                }
                if w == "from" || w == "join" {
                    *in_from.last_mut().unwrap() = true;
                    // FROM's first item.
                    check_relation(&tokens, i + 1, &local, false, &mut found);
                } else if END_OF_FROM.contains(&w) {
                    *in_from.last_mut().unwrap() = false;
                }
                let called = matches!(tokens.get(i + 1), Some(Token::Punct('(')));
                let after_as = word(before) == Some("as");
                // A relation's column list (`INSERT INTO t (a, b)`), checked as a relation.
                let after_as = after_as || matches!(word(before), Some("into" | "table"));
                if called && !after_dot && !after_as && !KEYWORDS_BEFORE_PAREN.contains(&w) {
                    found.push(format!("{w}(...)"));
                }
                if called && after_dot && i >= 2 && !is_trusted_schema(i - 2) {
                    found.push(format!("{w}(...) in an untrusted schema"));
                }
                if w == "operator" && called {
                    // OPERATOR(pg_catalog.=)
                    let trusted = is_trusted_schema(i + 2)
                        && matches!(tokens.get(i + 3), Some(Token::Punct('.')))
                        && matches!(tokens.get(i + 4), Some(Token::Op(_)))
                        && matches!(tokens.get(i + 5), Some(Token::Punct(')')));
                    if !trusted {
                        found.push("OPERATOR(...) not in pg_catalog".into());
                    }
                    i += 6;
                    continue;
                }
            }
            Token::Punct(',') if *in_from.last().unwrap() => {
                check_relation(&tokens, i + 1, &local, false, &mut found);
            }
            Token::Op(op) if op == "::" => {
                let qualified = is_trusted_schema(i + 1) && is_qualified(i + 1);
                if !qualified {
                    found.push(format!(
                        "a cast to an unqualified type ({:?})",
                        tokens.get(i + 1)
                    ));
                }
            }
            Token::Op(op) if op == "=>" => {}
            Token::Op(op) if op == "*" => {
                let star = matches!(before, Some(Token::Punct('(' | '.' | ',')))
                    || word(before) == Some("select");
                if !star {
                    found.push("*".into());
                }
            }
            Token::Op(op) if op == "=" && *in_set.last().unwrap() => {}
            Token::Op(op) => found.push(format!("the operator {op}")),
            _ => {}
        }
        i += 1;
    }
    found
}

/// The item of a `FROM` list at `at` (or the relation `INTO` or `TABLE` names, which may
/// have a column list): a qualified relation, a name the statement defines, a subquery or
/// a function (checked as a call).
fn check_relation(
    tokens: &[Token],
    at: usize,
    local: &[String],
    column_list: bool,
    found: &mut Vec<String>,
) {
    let Some(Token::Word(name)) = tokens.get(at) else {
        return;
    };
    if matches!(name.as_str(), "lateral" | "rows" | "only") {
        return;
    }
    let next = tokens.get(at + 1);
    let call = !column_list && matches!(next, Some(Token::Punct('(')));
    if call || matches!(next, Some(Token::Punct('.'))) || local.contains(name) {
        return;
    }
    found.push(format!("the relation {name}"));
}

/// Whether a literal is a statement: it starts (after any `{placeholder}`) with a verb.
fn is_statement(literal: &str) -> bool {
    const VERBS: &[&str] = &[
        "SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "LISTEN", "UNLISTEN", "GRANT", "REVOKE",
        "SET", "CREATE", "ALTER", "DROP", "LOCK", "NOTIFY", "BEGIN", "COMMIT", "DO", "CALL",
        "TRUNCATE", "COPY", "EXPLAIN", "RESET",
    ];
    let mut text = literal.trim_start();
    while let Some(rest) = text.strip_prefix('{') {
        match rest.find('}') {
            Some(end) => text = rest[end + 1..].trim_start(),
            None => return false,
        }
    }
    VERBS.iter().any(|verb| {
        text.strip_prefix(verb).is_some_and(|rest| {
            // LISTEN and UNLISTEN name a quoted channel (a line of output may start with
            // the word).
            let channel = rest.trim_start().starts_with(['"', '{']);
            (rest.is_empty() || rest.starts_with([' ', '\n', ';', '(']))
                && (!verb.ends_with("LISTEN") || channel)
        })
    })
}

/// The string literals of a Rust source, decoded, outside comments and unit tests.
fn literals(source: &str) -> Vec<String> {
    // Unit tests send no SQL to a server of a user's.
    let source = match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    };
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i = find(&chars, i + 2, &['*', '/']).map_or(chars.len(), |e| e + 2);
        } else if c == '\'' {
            // A character literal ('x', '\n', '\'') or a lifetime ('a).
            if chars.get(i + 1) == Some(&'\\') {
                i = (i + 2..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .map_or(chars.len(), |e| e + 1);
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c == 'r'
            && matches!(chars.get(i + 1), Some('"' | '#'))
            && !ident_before(&chars, i)
        {
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            let open = i + 1 + hashes;
            if chars.get(open) != Some(&'"') {
                i += 1;
                continue;
            }
            let mut close = vec!['"'];
            close.extend(std::iter::repeat_n('#', hashes));
            let end = find(&chars, open + 1, &close).unwrap_or(chars.len());
            out.push(chars[open + 1..end].iter().collect());
            i = end + close.len();
        } else if c == 'b' && chars.get(i + 1) == Some(&'"') && !ident_before(&chars, i) {
            // A byte string: skipped.
            i += 2;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '"' {
            let mut text = String::new();
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    match chars.get(i + 1) {
                        Some('\n') => {
                            i += 2;
                            while i < chars.len() && chars[i].is_whitespace() {
                                i += 1;
                            }
                            continue;
                        }
                        Some('n') => text.push('\n'),
                        Some('t') => text.push('\t'),
                        Some(&other) => text.push(other),
                        None => {}
                    }
                    i += 2;
                } else {
                    text.push(chars[i]);
                    i += 1;
                }
            }
            out.push(text);
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

#[test]
fn every_statement_in_the_sources_is_qualified() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut statements = 0;
    let mut problems = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        for literal in literals(&source) {
            if !is_statement(&literal) {
                continue;
            }
            statements += 1;
            let found = unqualified(&literal);
            if !found.is_empty() {
                let shown = file.strip_prefix(root).unwrap().display();
                problems.push(format!("{shown}: {found:?} in\n    {literal}"));
            }
        }
    }
    assert!(
        statements >= 20,
        "only {statements} statements found: is the scanner reading the sources?"
    );
    assert!(
        problems.is_empty(),
        "unqualified names:\n{}",
        problems.join("\n")
    );
}

/// Migrations after V4 pin the search path for their whole transaction, and every function
/// they create fixes its own. (V1 to V4 are as released: their checksums are in deployed
/// history tables. Every call in them has an exact match in `pg_catalog`, which the default
/// path searches first; `tests/hostile.rs` runs them with objects planted.)
#[test]
fn migrations_pin_the_search_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: u32 = name
            .strip_prefix('V')
            .and_then(|rest| rest.split("__").next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: not V{{n}}__name.sql"));
        let text = std::fs::read_to_string(&path).unwrap();
        let functions = text.matches("CREATE FUNCTION").count()
            + text.matches("CREATE OR REPLACE FUNCTION").count();
        let pinned = text
            .matches("SET search_path = pg_catalog, pg_temp")
            .count();
        if version <= 4 {
            assert!(
                pinned >= functions,
                "{name}: a function without its own search path"
            );
            continue;
        }
        checked += 1;
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
            .unwrap_or("");
        assert_eq!(
            first, "SET LOCAL search_path = pg_catalog, pg_temp;",
            "{name}: the first statement pins the search path"
        );
        assert!(
            pinned >= functions,
            "{name}: {functions} functions, {pinned} fixing their search path"
        );
    }
    assert!(checked >= 1, "no migration after V4");
}

#[test]
fn the_checker_finds_what_it_must() {
    let bad = [
        ("SELECT pg_notify($1, $2)", "pg_notify"),
        ("SELECT 1 FROM unnest($1::text[])", "unnest"),
        ("SELECT 1 WHERE c.oid = pg_catalog.to_regclass('x')", "="),
        ("SELECT a || b", "||"),
        ("SELECT $1::text", "cast"),
        ("SELECT n FROM pg_roles", "relation"),
        ("SELECT 1 FROM updatepipe.log WHERE channel IN ('a')", "in"),
        ("SELECT count(*) FROM updatepipe.log", "count"),
        ("SELECT x FROM public.f()", "untrusted"),
        ("SELECT 1 WHERE a OPERATOR(public.=) b", "OPERATOR"),
        ("SELECT CASE x WHEN 1 THEN 2 END", "CASE"),
        ("SELECT extract(epoch FROM pg_catalog.now())", "extract"),
        ("SELECT 1 FROM updatepipe.log l, pg_class c", "pg_class"),
        (
            "SELECT 1 FROM updatepipe.log WHERE NOT a IS DISTINCT FROM b",
            "distinct",
        ),
        ("CREATE TEMP TABLE messages (a pg_catalog.int4)", "messages"),
        ("INSERT INTO messages VALUES (1)", "messages"),
    ];
    for (sql, what) in bad {
        let found = unqualified(sql);
        assert!(
            found.iter().any(|f| f.contains(what)),
            "{sql}: expected {what:?}, found {found:?}"
        );
    }
    let good = [
        "SELECT pg_catalog.pg_notify($1, $2)",
        "SELECT 1 FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[])) WITH ORDINALITY AS t(p, n) ORDER BY n",
        "WITH me AS MATERIALIZED (SELECT 1), x AS (SELECT * FROM me) SELECT page.* FROM x, me",
        "SELECT pg_catalog.count(*) FROM updatepipe.log l WHERE l.channel OPERATOR(pg_catalog.=) $1",
        "SET statement_timeout = 100; SET lock_timeout = 5",
        "SELECT pg_catalog.make_interval(secs => $2)",
        "INSERT INTO updatepipe.pruned (channel) VALUES ('x') ON CONFLICT (channel) DO UPDATE SET channel = excluded.channel",
        "LISTEN \"a\"\"b\"",
        "CREATE TEMP TABLE pg_temp.messages (a pg_catalog.int4)",
        "SELECT coalesce($1, 'it''s -- not a comment')",
    ];
    for sql in good {
        assert_eq!(unqualified(sql), Vec::<String>::new(), "{sql}");
    }
    assert!(is_statement("LISTEN {}; LISTEN {}"));
    assert!(!is_statement("LISTEN works        yes"));
    assert_eq!(
        literals("let a = \"SELECT \\\n    1\"; let b = r#\"x\"y\"#; // \"no\"\n let c = 'a';"),
        ["SELECT 1", "x\"y"]
    );
}

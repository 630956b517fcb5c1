/*
 * _lpre2: a C ABI over Google RE2 for LuaJIT's ffi (engine/plugins/re2.lua), so T.re2 objects and
 * HTTPHeader:match_value run the real RE2 engine: linear-time matching whatever the pattern or the
 * (untrusted) text, exactly Trisul's semantics (reference section 6.9).  Built by setup.py when the RE2
 * headers are installed (Debian: libre2-dev); LuaJIT loads the .so with ffi.load, Python never imports it
 * except to locate it.
 */
#include <Python.h>
#include <re2/re2.h>
#include <string.h>

extern "C" {

/* Option bits, in the order of the reference's option names (engine/plugins/re2.lua OPT). */
enum { LP_UTF8 = 1, LP_POSIX = 2, LP_LONGEST = 4, LP_LOG_ERRORS = 8, LP_LITERAL = 16, LP_NEVER_NL = 32,
       LP_NEVER_CAPTURE = 64, LP_CASE_SENSITIVE = 128 };

/* Compile `pat` (len bytes).  Returns the RE2 object, or NULL with the error text in err (NUL-terminated). */
void *lp_re2_new(const char *pat, size_t len, int flags, char *err, size_t errlen) {
  RE2::Options o;
  o.set_encoding((flags & LP_UTF8) ? RE2::Options::EncodingUTF8 : RE2::Options::EncodingLatin1);
  o.set_posix_syntax(flags & LP_POSIX);
  o.set_longest_match(flags & LP_LONGEST);
  o.set_log_errors(flags & LP_LOG_ERRORS);
  o.set_literal(flags & LP_LITERAL);
  o.set_never_nl(flags & LP_NEVER_NL);
  o.set_never_capture(flags & LP_NEVER_CAPTURE);
  o.set_case_sensitive(flags & LP_CASE_SENSITIVE);
  RE2 *re = new (std::nothrow) RE2(re2::StringPiece(pat, len), o);
  if (re == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  if (!re->ok()) {
    snprintf(err, errlen, "%s", re->error().c_str());
    delete re;
    return NULL;
  }
  return re;
}

void lp_re2_free(void *re) { delete static_cast<RE2 *>(re); }

int lp_re2_groups(void *re) { return static_cast<RE2 *>(re)->NumberOfCapturingGroups(); }

/* Match text[0..len) unanchored (anchor 0) or as a whole (anchor 1).  On a match returns 1 and writes, for the
 * whole match and groups 1..nsub, the byte offsets spans[2k] = start, spans[2k+1] = end (exclusive), -1 for a
 * group that did not take part.  Returns 0 for no match. */
int lp_re2_match(void *rp, const char *text, size_t len, int anchor, int nsub, long *spans) {
  RE2 *re = static_cast<RE2 *>(rp);
  re2::StringPiece in(text, len);
  re2::StringPiece m[33];
  if (nsub > 32) nsub = 32;
  int ask = nsub < re->NumberOfCapturingGroups() ? nsub : re->NumberOfCapturingGroups();   /* RE2 refuses more */
  if (!re->Match(in, 0, len, anchor ? RE2::ANCHOR_BOTH : RE2::UNANCHORED, m, ask + 1)) return 0;
  for (int k = 0; k <= nsub; k++) {
    if (k > ask || m[k].data() == NULL) { spans[2 * k] = -1; spans[2 * k + 1] = -1; }
    else { spans[2 * k] = m[k].data() - text; spans[2 * k + 1] = m[k].data() - text + m[k].size(); }
  }
  return 1;
}

static struct PyModuleDef lpre2_module = {
  PyModuleDef_HEAD_INIT, "_lpre2", "RE2 for LuaJIT FFI (use via ffi.load).", -1, NULL, NULL, NULL, NULL, NULL
};
PyMODINIT_FUNC PyInit__lpre2(void) { return PyModule_Create(&lpre2_module); }

}  /* extern "C" */

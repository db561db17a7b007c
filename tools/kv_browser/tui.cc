// The terminal UI (ncurses): a list pane (tags, then files, then
// parameters), a detail pane, and a status line. Read-only; `r` reopens the
// store to see commits a training process made meanwhile.
#include <algorithm>
#include <iostream>

#include "tools/kv_browser/text.h"
#include "tools/kv_browser/tui.h"

// After the project's headers: ncurses defines OK and ERR as macros.
#include <ncurses.h>

namespace ckptkv::kvb {

namespace {

struct Screen {
  Screen() {
    initscr();
    cbreak();
    noecho();
    keypad(stdscr, TRUE);
    curs_set(0);
  }
  ~Screen() { endwin(); }
};

void Put(int y, int x, const std::string& s, int width, attr_t attr = A_NORMAL) {
  if (width <= 0) return;
  attron(attr);
  mvaddnstr(y, x, s.c_str(), width);
  attroff(attr);
}

// A full-screen text view (help, diff, verify); any key closes it.
void ShowText(const std::string& title, const std::vector<std::string>& lines) {
  size_t top = 0;
  for (;;) {
    erase();
    int h = LINES, w = COLS;
    Put(0, 0, title, w, A_REVERSE);
    for (int y = 1; y < h - 1 && top + static_cast<size_t>(y - 1) < lines.size(); ++y) {
      Put(y, 0, lines[top + static_cast<size_t>(y - 1)], w);
    }
    Put(h - 1, 0, "up/down scroll, any other key closes", w, A_REVERSE);
    refresh();
    int ch = getch();
    if (ch == KEY_DOWN || ch == 'j') {
      if (top + 1 < lines.size()) ++top;
    } else if (ch == KEY_UP || ch == 'k') {
      if (top > 0) --top;
    } else if (ch != KEY_RESIZE) {
      return;
    }
  }
}

// Reads a line on the status line (the filter).
std::string Prompt(const std::string& label, const std::string& initial) {
  std::string s = initial;
  curs_set(1);
  for (;;) {
    move(LINES - 1, 0);
    clrtoeol();
    Put(LINES - 1, 0, label + s, COLS);
    refresh();
    int ch = getch();
    if (ch == '\n' || ch == KEY_ENTER) break;
    if (ch == 27) {  // escape: keep the old filter
      s = initial;
      break;
    }
    if (ch == KEY_BACKSPACE || ch == 127 || ch == 8) {
      if (!s.empty()) s.pop_back();
    } else if (ch >= 32 && ch < 127) {
      s += static_cast<char>(ch);
    }
  }
  curs_set(0);
  return s;
}

}  // namespace

int RunTui(const std::string& db) {
  auto b_or = Browser::Open(db, Browser::Mode::kReadOnly);
  if (!b_or.ok()) return ReportError(b_or.status());
  Browser& b = **b_or;
  TuiModel m(b);
  std::vector<size_t> cursor_stack;  // selection of the levels above
  size_t cursor = 0, top = 0;
  std::string message;
  Screen screen;
  for (;;) {
    auto rows_or = m.Rows();
    std::vector<TuiRow> rows;
    if (rows_or.ok()) {
      rows = std::move(rows_or).value();
    } else {
      message = "error: " + rows_or.status().message();
    }
    if (cursor >= rows.size()) cursor = rows.empty() ? 0 : rows.size() - 1;
    const int h = LINES, w = COLS;
    const int list_w = std::max(20, w * 11 / 20);
    const int body = std::max(1, h - 2);
    if (cursor < top) top = cursor;
    if (cursor >= top + static_cast<size_t>(body)) top = cursor - static_cast<size_t>(body) + 1;

    erase();
    std::string title = "kv-browser  " + db + "  |  " + m.Where() + "  |  sort: " + m.SortName();
    if (!m.filter.empty()) title += "  |  filter: " + m.filter;
    Put(0, 0, title + std::string(std::max(0, w - static_cast<int>(title.size())), ' '), w,
        A_REVERSE);
    for (int y = 0; y < body && top + static_cast<size_t>(y) < rows.size(); ++y) {
      size_t i = top + static_cast<size_t>(y);
      Put(1 + y, 0, rows[i].label, list_w - 1, i == cursor ? A_REVERSE : A_NORMAL);
    }
    if (rows.empty())
      Put(1, 0, m.filter.empty() ? "(empty)" : "(nothing matches the filter)", list_w);
    if (!rows.empty()) {
      auto detail = m.Detail(rows[cursor], w - list_w - 1);
      for (int y = 0; y < body && static_cast<size_t>(y) < detail.size(); ++y) {
        Put(1 + y, list_w + 1, detail[static_cast<size_t>(y)], w - list_w - 1);
      }
    }
    mvvline(1, list_w, '|', body);  // plain ASCII: readable in any terminal
    std::string status = message.empty()
                             ? "? help  / filter  s sort  space mark  d diff  v verify  "
                               "r refresh  q quit"
                             : message;
    Put(h - 1, 0, status + std::string(std::max(0, w - static_cast<int>(status.size())), ' '), w,
        A_REVERSE);
    refresh();
    message.clear();

    int ch = getch();
    switch (ch) {
      case 'q':
        return 0;
      case KEY_DOWN:
      case 'j':
        if (cursor + 1 < rows.size()) ++cursor;
        break;
      case KEY_UP:
      case 'k':
        if (cursor > 0) --cursor;
        break;
      case KEY_NPAGE:
        cursor = std::min(rows.empty() ? 0 : rows.size() - 1, cursor + static_cast<size_t>(body));
        break;
      case KEY_PPAGE:
        cursor = cursor > static_cast<size_t>(body) ? cursor - static_cast<size_t>(body) : 0;
        break;
      case '\n':
      case KEY_ENTER:
      case KEY_RIGHT:
      case 'l':
        if (rows.empty() || m.level == TuiLevel::kParams) break;
        if (m.level == TuiLevel::kTags) {
          m.tag = rows[cursor].key;
          m.level = TuiLevel::kFiles;
        } else {
          m.file = rows[cursor].key;
          m.level = TuiLevel::kParams;
        }
        cursor_stack.push_back(cursor);
        cursor = top = 0;
        m.filter.clear();
        break;
      case KEY_LEFT:
      case KEY_BACKSPACE:
      case 127:
      case 'h':
        if (m.level == TuiLevel::kTags) break;
        m.level = m.level == TuiLevel::kParams ? TuiLevel::kFiles : TuiLevel::kTags;
        cursor = cursor_stack.empty() ? 0 : cursor_stack.back();
        if (!cursor_stack.empty()) cursor_stack.pop_back();
        m.filter.clear();
        break;
      case '/':
        m.filter = Prompt("filter: ", m.filter);
        cursor = top = 0;
        break;
      case 's':
        m.sort = m.sort == TuiSort::kOrder  ? TuiSort::kName
                 : m.sort == TuiSort::kName ? TuiSort::kSize
                                            : TuiSort::kOrder;
        break;
      case ' ':
      case 'm':
        if (m.level != TuiLevel::kTags || rows.empty()) break;
        if (!m.marked.erase(rows[cursor].key)) {
          if (m.marked.size() >= 2) m.marked.erase(m.marked.begin());
          m.marked.insert(rows[cursor].key);
        }
        break;
      case 'd':
        ShowText("diff", m.DiffLines());
        break;
      case 'v':
      case 'V': {
        std::string t = m.level == TuiLevel::kTags
                            ? (rows.empty() || ch == 'V' ? "" : rows[cursor].key)
                            : m.tag;
        Put(h - 1, 0, "verifying...", w, A_REVERSE);
        refresh();
        ShowText("verify", m.VerifyLines(t));
        break;
      }
      case 'r': {
        Status s = b.Refresh();
        message = s.ok() ? "refreshed" : "error: " + s.message();
        break;
      }
      case '?':
        ShowText("help", TuiModel::HelpLines());
        break;
      default:
        break;
    }
  }
}

}  // namespace ckptkv::kvb

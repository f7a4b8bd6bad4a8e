package npy

import (
	"strconv"
	"strings"

	"github.com/shmserve/shmserve/goclient/protocol"
)

// header is what the header dictionary says.
type header struct {
	dtype protocol.DType
	shape []int
}

// maxRank bounds the dims a header may list; numpy's own limit is 64.
const maxRank = 64

// parseHeader parses the header dictionary, a Python literal such as
//
//	{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//
// padded with spaces and ended by a newline. It takes exactly the three keys
// numpy writes, each once, and the value syntax numpy writes for them:
// quoted strings without escapes, True or False, and tuples of
// non-negative integers.
func parseHeader(text string) (header, error) {
	p := &headerParser{text: strings.TrimRight(text, " \t\n\r\x00")}
	var h header
	seen := map[string]bool{}
	if err := p.expect('{'); err != nil {
		return h, err
	}
	for !p.peek('}') {
		key, err := p.str()
		if err != nil {
			return h, err
		}
		if seen[key] {
			return h, formatError("header key %q given twice", key)
		}
		seen[key] = true
		if err := p.expect(':'); err != nil {
			return h, err
		}
		switch key {
		case "descr":
			if p.peek('[') {
				return h, formatError("structured dtypes (a list descr) are not tensors")
			}
			descr, err := p.str()
			if err != nil {
				return h, err
			}
			if h.dtype, err = dtypeOf(descr); err != nil {
				return h, err
			}
		case "fortran_order":
			fortran, err := p.boolean()
			if err != nil {
				return h, err
			}
			if fortran {
				return h, formatError("the array is in Fortran order; save it in C order (numpy.ascontiguousarray)")
			}
		case "shape":
			if h.shape, err = p.tuple(); err != nil {
				return h, err
			}
		default:
			return h, formatError("unknown header key %q", key)
		}
		if !p.peek('}') {
			if err := p.expect(','); err != nil {
				return h, err
			}
		}
	}
	p.expect('}')
	if p.skipSpace(); p.pos != len(p.text) {
		return h, formatError("text after the header dictionary at byte %d", p.pos)
	}
	for _, key := range []string{"descr", "fortran_order", "shape"} {
		if !seen[key] {
			return h, formatError("the header has no %q", key)
		}
	}
	return h, nil
}

type headerParser struct {
	text string
	pos  int
}

func (p *headerParser) skipSpace() {
	for p.pos < len(p.text) && strings.IndexByte(" \t\n\r", p.text[p.pos]) >= 0 {
		p.pos++
	}
}

// peek skips space and reports whether the next byte is c.
func (p *headerParser) peek(c byte) bool {
	p.skipSpace()
	return p.pos < len(p.text) && p.text[p.pos] == c
}

func (p *headerParser) expect(c byte) error {
	if !p.peek(c) {
		return p.unexpected(string(c))
	}
	p.pos++
	return nil
}

func (p *headerParser) unexpected(want string) error {
	if p.pos >= len(p.text) {
		return formatError("the header ends where %s should be", want)
	}
	return formatError("header byte %d is %q, want %s", p.pos, p.text[p.pos], want)
}

func (p *headerParser) str() (string, error) {
	p.skipSpace()
	if p.pos >= len(p.text) || (p.text[p.pos] != '\'' && p.text[p.pos] != '"') {
		return "", p.unexpected("a quoted string")
	}
	quote := p.text[p.pos]
	end := strings.IndexByte(p.text[p.pos+1:], quote)
	if end < 0 {
		return "", formatError("a string in the header is not closed")
	}
	s := p.text[p.pos+1 : p.pos+1+end]
	if strings.IndexByte(s, '\\') >= 0 {
		return "", formatError("escapes in header strings are not supported: %q", s)
	}
	p.pos += end + 2
	return s, nil
}

func (p *headerParser) boolean() (bool, error) {
	p.skipSpace()
	for word, value := range map[string]bool{"True": true, "False": false} {
		if strings.HasPrefix(p.text[p.pos:], word) {
			p.pos += len(word)
			return value, nil
		}
	}
	return false, p.unexpected("True or False")
}

// tuple parses "()", "(3,)" or "(2, 3)" (a trailing comma allowed).
func (p *headerParser) tuple() ([]int, error) {
	if err := p.expect('('); err != nil {
		return nil, err
	}
	shape := []int{}
	for !p.peek(')') {
		if len(shape) == maxRank {
			return nil, formatError("a shape of more than %d dims", maxRank)
		}
		start := p.pos
		for p.pos < len(p.text) && p.text[p.pos] >= '0' && p.text[p.pos] <= '9' {
			p.pos++
		}
		if p.pos == start {
			return nil, p.unexpected("a dimension (a non-negative integer)")
		}
		d, err := strconv.ParseInt(p.text[start:p.pos], 10, 64)
		if err != nil {
			return nil, formatError("dimension %s: %v", p.text[start:p.pos], err)
		}
		if p.pos < len(p.text) && p.text[p.pos] == 'L' { // Python 2's long literal
			p.pos++
		}
		shape = append(shape, int(d))
		if !p.peek(')') {
			if err := p.expect(','); err != nil {
				return nil, err
			}
		}
	}
	p.pos++
	return shape, nil
}

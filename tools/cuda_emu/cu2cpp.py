#!/usr/bin/env python3
# Rewrite a .cu file so g++ can compile it against the emulator: launches -> ::emu::launch, __shared__ -> emulator smem.
import re, sys
src = open(sys.argv[1]).read()

def rewrite_launches(s):
    out = []
    i = 0
    while True:
        j = s.find('<<<', i)
        if j < 0:
            out.append(s[i:]); break
        # kernel expression: back up over whitespace, then identifier possibly with <...> template args
        k = j
        while k > 0 and s[k-1].isspace(): k -= 1
        e = k
        if s[k-1] == '>':
            depth = 0
            while True:
                k -= 1
                if s[k] == '>': depth += 1
                elif s[k] == '<':
                    depth -= 1
                    if depth == 0: break
        while k > 0 and (s[k-1].isalnum() or s[k-1] in '_:'): k -= 1
        kern = s[k:e]
        end = s.find('>>>', j)
        cfg = s[j+3:end]
        p = end + 3
        while s[p].isspace(): p += 1
        assert s[p] == '(', s[j-50:p+10]
        # find the closing parenthesis of the argument list
        depth = 0
        q = p
        while True:
            if s[q] == '(': depth += 1
            elif s[q] == ')':
                depth -= 1
                if depth == 0: break
            q += 1
        args = s[p+1:q]
        out.append(s[i:k])
        out.append('::emu::launch_l(::emu::Cfg{%s}, [&]() { %s(%s); })' % (cfg, kern, args))
        i = q + 1
    return ''.join(out)

src = rewrite_launches(src)
# dynamic shared memory
src = re.sub(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:\s]+?)\s+(\w+)\s*\[\s*\]\s*;',
             r'\1* \2 = reinterpret_cast<\1*>(::emu::smem());', src)
# static shared memory: one static array, refilled with 0xff at the first touch in each block
def stat(m):
    typ, name, dims = m.group(1), m.group(2), m.group(3)
    return 'static %s %s%s; ::emu::shared_init(%s, sizeof(%s));' % (typ, name, dims, name, name)
src = re.sub(r'__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)((?:\s*\[[^\]]+\])+)\s*;', stat, src)
assert '__shared__' not in src, [l for l in src.splitlines() if '__shared__' in l]
sys.stdout.write(src)

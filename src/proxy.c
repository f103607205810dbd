/*-------------------------------------------------------------------------
 *
 * proxy.c
 *	  The setting taptalk.proxy: the HTTP(S) or SOCKS proxy that requests to
 *	  TapTalk go through, and keeping its password out of sight.
 *
 * The setting is a URL, scheme://[user[:password]@]host[:port][/], with
 * scheme http, https or socks5h; user and password may be percent-encoded.
 * Its check hook parses it once, into the setting's extra, so the
 * transport only reads the parts: the proxy's URL without credentials (the
 * port always written out), its "host:port" for messages, and the decoded
 * user name and password, which the transport hands to libcurl separately.
 *
 * socks5:// is refused: with it libcurl resolves TapTalk's host name on the
 * database server, which the proxy is there to avoid (and a server that
 * cannot resolve outside names could not use it); socks5h:// lets the proxy
 * resolve the name.  SOCKS4 sends no password and resolves locally as well.
 *
 * The password is as secret as the server key: the setting is
 * superuser-only and not listed in pg_settings (whose reset_val would show
 * it), SHOW shows the URL with the password masked, and secret.c's log hook
 * masks it (as written and decoded) in every message and keeps statements
 * naming the setting out of the log.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "utils/guc.h"

#include "taptalk.h"

#define PROXY_SETTING "taptalk.proxy"

/* taptalk.proxy as set */
char	   *taptalk_proxy_setting = NULL;

/* the parsed setting in effect (its extra), or NULL when it is empty */
static TaptalkProxy *proxy_in_effect = NULL;

/* its password as written and decoded, for the log mask */
static char *password_written = NULL;
static char *password_decoded = NULL;

#if PG_VERSION_NUM >= 160000
#define extra_malloc(size) guc_malloc(LOG, (size))
#else
#define extra_malloc(size) malloc(size)
#endif

static int
hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Percent-decode src[0..len) into dst (at least len + 1 bytes).  Returns
 * false for a "%" not followed by two hexadecimal digits, or a decoded NUL.
 */
static bool
percent_decode(const char *src, size_t len, char *dst)
{
	size_t		o = 0;

	for (size_t i = 0; i < len; i++)
	{
		if (src[i] == '%')
		{
			int			hi = i + 1 < len ? hex_value(src[i + 1]) : -1;
			int			lo = i + 2 < len ? hex_value(src[i + 2]) : -1;

			if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
				return false;
			dst[o++] = (char) (hi * 16 + lo);
			i += 2;
		}
		else
			dst[o++] = src[i];
	}
	dst[o] = '\0';
	return true;
}

/*
 * taptalk.proxy: parse the URL into a TaptalkProxy allocated as one block
 * (the setting's extra), or refuse it with a detail saying why.
 */
static bool
check_proxy(char **newval, void **extra, GucSource source)
{
	const char *url = *newval;
	const char *scheme;
	TaptalkProxyType type;
	const char *rest;
	size_t		authority_len;
	const char *at = NULL;
	const char *hostport;
	size_t		hostport_len;
	const char *host;
	size_t		host_len;
	const char *port_text = NULL;
	size_t		port_len = 0;
	long		port;
	const char *problem = NULL;
	const char *user = NULL;
	size_t		user_len = 0;
	const char *password = NULL;
	size_t		password_len = 0;
	size_t		size;
	TaptalkProxy *proxy;
	char	   *p;

	if (url == NULL || url[0] == '\0')
		return true;			/* no proxy */

	for (const char *c = url; *c; c++)
	{
		if ((unsigned char) *c <= ' ' || *c == 0x7f)
		{
			problem = "The URL contains a space or a control character.";
			goto refuse;
		}
	}

	if (pg_strncasecmp(url, "http://", 7) == 0)
		scheme = "http", type = TAPTALK_PROXY_HTTP, port = 1080;
	else if (pg_strncasecmp(url, "https://", 8) == 0)
		scheme = "https", type = TAPTALK_PROXY_HTTPS, port = 443;
	else if (pg_strncasecmp(url, "socks5h://", 10) == 0)
		scheme = "socks5h", type = TAPTALK_PROXY_SOCKS5H, port = 1080;
	else if (pg_strncasecmp(url, "socks5://", 9) == 0 ||
			 pg_strncasecmp(url, "socks4://", 9) == 0 ||
			 pg_strncasecmp(url, "socks4a://", 10) == 0 ||
			 pg_strncasecmp(url, "socks://", 8) == 0)
	{
		problem = "Only socks5h:// SOCKS proxies are supported: with socks5:// and socks4:// TapTalk's host name would be resolved by the database server instead of the proxy, and SOCKS4 has no password.";
		goto refuse;
	}
	else
	{
		problem = "The proxy URL must start with http://, https:// or socks5h://.";
		goto refuse;
	}
	rest = url + strlen(scheme) + 3;

	/* the authority, then at most a "/" */
	authority_len = strcspn(rest, "/?#");
	if (rest[authority_len] != '\0' && strcmp(rest + authority_len, "/") != 0)
	{
		problem = "The proxy URL must not have a path, a query or a fragment.";
		goto refuse;
	}

	for (const char *c = rest; c < rest + authority_len; c++)
	{
		if (*c != '@')
			continue;
		if (at != NULL)
		{
			problem = "The proxy URL contains more than one \"@\"; write an \"@\" in the user name or password as %40.";
			goto refuse;
		}
		at = c;
	}
	if (at != NULL)
	{
		const char *colon = memchr(rest, ':', at - rest);

		user = rest;
		user_len = colon ? (size_t) (colon - rest) : (size_t) (at - rest);
		if (colon != NULL)
		{
			password = colon + 1;
			password_len = at - password;
		}
		if (user_len == 0)
		{
			problem = "The proxy URL has credentials without a user name.";
			goto refuse;
		}
		hostport = at + 1;
	}
	else
		hostport = rest;
	hostport_len = rest + authority_len - hostport;

	/* host: a name, an IPv4 address or a bracketed IPv6 address */
	host = hostport;
	if (hostport_len > 0 && hostport[0] == '[')
	{
		const char *close = memchr(hostport, ']', hostport_len);

		if (close == NULL || close == hostport + 1)
		{
			problem = "The proxy URL has an invalid IPv6 address.";
			goto refuse;
		}
		for (const char *c = hostport + 1; c < close; c++)
		{
			if (hex_value(*c) < 0 && *c != ':' && *c != '.')
			{
				problem = "The proxy URL has an invalid IPv6 address.";
				goto refuse;
			}
		}
		host_len = close + 1 - hostport;
	}
	else
	{
		host_len = strcspn(hostport, ":/");
		if (host_len > hostport_len)
			host_len = hostport_len;
		for (const char *c = hostport; c < hostport + host_len; c++)
		{
			if (!isalnum((unsigned char) *c) && *c != '-' && *c != '.' && *c != '_')
			{
				problem = "The proxy URL has an invalid host name.";
				goto refuse;
			}
		}
	}
	if (host_len == 0)
	{
		problem = "The proxy URL has no host.";
		goto refuse;
	}
	if (host_len < hostport_len)
	{
		if (hostport[host_len] != ':')
		{
			problem = "The proxy URL has an invalid host name.";
			goto refuse;
		}
		port_text = hostport + host_len + 1;
		port_len = hostport_len - host_len - 1;
		port = 0;
		for (size_t i = 0; i < port_len && port <= 65535; i++)
		{
			if (!isdigit((unsigned char) port_text[i]))
			{
				port = -1;
				break;
			}
			port = port * 10 + (port_text[i] - '0');
		}
		if (port_len == 0 || port < 1 || port > 65535)
		{
			problem = "The proxy's port must be a number from 1 to 65535.";
			goto refuse;
		}
	}

	/* one block: the struct, then its strings */
	size = sizeof(TaptalkProxy) +
		strlen(scheme) + 3 + host_len + 7 + 1 +	/* url */
		host_len + 7 + 1 +		/* name */
		user_len + 1 + password_len + 1 + password_len + 1 +
		strlen(url) + strlen(TAPTALK_MASK) + 1; /* shown */
	proxy = extra_malloc(size);
	if (proxy == NULL)
		return false;
	memset(proxy, 0, size);
	proxy->type = type;
	p = (char *) (proxy + 1);

	proxy->url = p;
	p += sprintf(p, "%s://%.*s:%ld", scheme, (int) host_len, host, port) + 1;
	proxy->name = p;
	p += sprintf(p, "%.*s:%ld", (int) host_len, host, port) + 1;

	if (user != NULL)
	{
		proxy->user = p;
		if (!percent_decode(user, user_len, p))
			problem = "The proxy's user name has an invalid percent-encoding (\"%\" must be followed by two hexadecimal digits, and %00 is not allowed).";
		p += strlen(p) + 1;
	}
	if (password != NULL && problem == NULL)
	{
		proxy->password_written = p;
		memcpy(p, password, password_len);
		p += password_len + 1;
		proxy->password = p;
		if (!percent_decode(password, password_len, p))
			problem = "The proxy's password has an invalid percent-encoding (\"%\" must be followed by two hexadecimal digits, and %00 is not allowed).";
		p += strlen(p) + 1;
	}
	if (problem != NULL)
	{
		explicit_bzero(proxy, size);
#if PG_VERSION_NUM >= 160000
		guc_free(proxy);
#else
		free(proxy);
#endif
		goto refuse;
	}

	/* what SHOW shows: the URL with its password masked */
	proxy->shown = p;
	if (password != NULL)
		sprintf(p, "%.*s%s%s", (int) (password - url), url, TAPTALK_MASK,
				password + password_len);
	else
		strcpy(p, url);

	*extra = proxy;
	return true;

refuse:
	GUC_check_errdetail("%s", problem);
	GUC_check_errhint("Set \"" PROXY_SETTING "\" to a URL such as http://proxy.example:3128 or socks5h://user:password@proxy.example:1080, or to an empty string for no proxy.");
	return false;
}

static void
assign_proxy(const char *newval, void *extra)
{
	proxy_in_effect = (TaptalkProxy *) extra;
	password_written = proxy_in_effect ? proxy_in_effect->password_written : NULL;
	password_decoded = proxy_in_effect ? proxy_in_effect->password : NULL;
}

/* SHOW, current_setting(): the URL with the password masked */
static const char *
show_proxy(void)
{
	if (proxy_in_effect != NULL)
		return proxy_in_effect->shown;
	return taptalk_proxy_setting ? taptalk_proxy_setting : "";
}

/* The proxy in effect, or NULL for none. */
const TaptalkProxy *
taptalk_proxy(void)
{
	return proxy_in_effect;
}

void
taptalk_proxy_init(void)
{
	DefineCustomStringVariable(PROXY_SETTING,
							   "Sets the proxy that requests to TapTalk go through.",
							   "A URL: http://, https:// or socks5h://, with optional "
							   "user:password@ and :port. Empty means no proxy; the "
							   "server's proxy environment variables are ignored.",
							   &taptalk_proxy_setting,
							   "",
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   check_proxy, assign_proxy, show_proxy);

	/* the word pair also catches "taptalk"."proxy" and set_config's forms */
	taptalk_hide_setting("taptalk", "proxy",
						 "(a statement naming " PROXY_SETTING ", not logged)",
						 &password_written, &password_decoded);
}
